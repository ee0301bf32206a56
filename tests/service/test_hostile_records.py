"""Hostile records on the real broker: each ends as a result or an error result plus a dead letter,
the jobs after it are answered, and the partition's committed offset reaches its end."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.codec import decode_result
from tests.service.hostile import RawRecord, post_raw

pytestmark = pytest.mark.kafka


def job(custom_id: str, **body) -> bytes:
    body = {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0, **body}
    return json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}).encode()


async def wait_for_commits(kafka, group_id: str, topic: str, timeout: float = 30) -> None:
    """Until every partition's committed offset equals its end offset (fails the test otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        ends = await kafka.end_offsets(topic)
        committed = await kafka.committed(group_id, topic)
        if all(committed.get(p) == end for p, end in ends.items() if end > 0):
            return
        assert time.monotonic() < deadline, f"committed {committed}, end offsets {ends}"
        await asyncio.sleep(0.3)


async def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_its_batch_still_runs(
    kafka, service_config, run_service
):
    jobs_topic = service_config.jobs_topics[0]
    records = [RawRecord(job(f"ok-{i}"), key=f"ok-{i}".encode()) for i in range(4)]
    records[2] = RawRecord(job("bad-key"), key=b"bad-key", headers=[(b"\xff\xfebad", b"v"), (b"ok", b"1")])
    await post_raw(kafka.bootstrap, jobs_topic, 0, records)
    async with run_service(service_config) as service:
        results = {r.key: decode_result(r.value) for r in await kafka.read(service_config.results_topic, 4)}
        (dead,) = await kafka.read(service_config.dlq_topic, 1)
        await wait_for_commits(kafka, service_config.group_id, jobs_topic)
        assert not service.engine_failure

    assert {k: r.is_error for k, r in results.items()} == {
        b"ok-0": False,
        b"ok-1": False,
        b"bad-key": True,
        b"ok-3": False,
    }
    assert results[b"bad-key"].failure.code == "invalid_encoding"
    assert "\\xff\\xfebad" in results[b"bad-key"].failure.message
    headers = dict(dead.headers)
    assert dead.value == records[2].value and dead.key == b"bad-key"
    assert headers["\\xff\\xfebad"] == b"v" and headers["ok"] == b"1"  # the bad key, escaped
    assert headers["sluice-error-code"] == b"invalid_encoding"
    assert headers["sluice-source-offset"] == b"2"


async def test_a_reply_to_outside_the_allow_list_gets_an_error_result_on_the_results_topic(
    kafka, service_config, run_service
):
    c = service_config
    elsewhere = f"{c.results_topic.removesuffix('.results')}.elsewhere"
    refused = [c.jobs_topics[0], c.dlq_topic, c.traces_topic, elsewhere, "bad topic!", "a" * 300]
    allowed = f"{c.results_topic}.run-1"
    jobs = [(f"r{i}".encode(), job(f"r{i}"), [("reply_to", t.encode())]) for i, t in enumerate(refused)]
    await kafka.post(c.jobs_topics[0], [*jobs, (b"ok", job("ok"), [("reply_to", allowed.encode())])])
    async with run_service(c):
        errors = {r.key: decode_result(r.value) for r in await kafka.read(c.results_topic, len(refused))}
        (reply,) = await kafka.read(allowed, 1)
        await wait_for_commits(kafka, c.group_id, c.jobs_topics[0])

    assert decode_result(reply.value).custom_id == "ok" and not decode_result(reply.value).is_error
    assert sorted(errors) == sorted(key for key, _, _ in jobs)
    assert {r.failure.code for r in errors.values()} == {"invalid_reply_to"}
    assert {r.response.body.error.param for r in errors.values()} == {"reply_to"}
    # nothing was written into the jobs topic, nor any topic created for a refused reply_to
    assert sum((await kafka.end_offsets(c.jobs_topics[0])).values()) == len(refused) + 1
    assert elsewhere not in await kafka.topic_names()


async def test_results_too_large_for_the_limit_or_the_broker_become_result_too_large_errors(
    kafka, service_config, run_service
):
    c = msgspec.structs.replace(service_config, max_result_bytes=20_000)
    small = f"{c.results_topic}.small"  # a reply topic that takes records of up to 4 kB
    await _create_topic(kafka, small, {"max.message.bytes": "4000"})
    logprobs = {"logprobs": 20, "ignore_eos": True}
    jobs = [
        (b"broker-refuses", job("broker-refuses", max_tokens=10, **logprobs), [("reply_to", small.encode())]),
        (b"over-limit", job("over-limit", max_tokens=40, **logprobs), []),  # ~23 kB
        (b"long-id", job("x" * 100_000), []),
    ]
    await kafka.post(c.jobs_topics[0], jobs)
    async with run_service(c):
        results = [decode_result(r.value) for r in await kafka.read(c.results_topic, 3)]
        dead = {r.key: dict(r.headers) for r in await kafka.read(c.dlq_topic, 3)}
        # the publisher recovers from the broker's refusal: the next result for that topic arrives
        await kafka.post(c.jobs_topics[0], [(b"canary", job("canary"), [("reply_to", small.encode())])])
        (canary,) = await kafka.read(small, 1)
        await wait_for_commits(kafka, c.group_id, c.jobs_topics[0])

    assert decode_result(canary.value).custom_id == "canary"
    by_id = {r.custom_id[:20]: r for r in results}
    assert {custom_id: r.failure.code for custom_id, r in by_id.items()} == {
        "broker-refuses": "result_too_large",
        "over-limit": "result_too_large",
        "x" * 20: "result_too_large",
    }
    assert "the broker refused the result as too large" in by_id["broker-refuses"].failure.message
    assert "results may have at most 20000" in by_id["over-limit"].failure.message
    assert by_id["x" * 20].custom_id.endswith("(custom_id cut from 100000 characters)")
    # the dead letter fits too: without the job's bytes
    assert dead[b"long-id"]["sluice-dropped"] == f"value ({len(jobs[2][1])} bytes)".encode()


async def _create_topic(kafka, name: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def test_a_fault_of_the_service_itself_gives_an_internal_error_result_and_moves_on(
    kafka, service_config, run_service, monkeypatch
):
    c = service_config
    async with run_service(c) as service:

        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(service.handler, "handle", broken)
        await kafka.post(c.jobs_topics[0], [(b"victim", job("victim"), [])])
        (result,) = await kafka.read(c.results_topic, 1)
        (dead,) = await kafka.read(c.dlq_topic, 1)
        await wait_for_commits(kafka, c.group_id, c.jobs_topics[0])
    line = decode_result(result.value)
    assert (line.failure.code, line.response.status_code) == ("internal_error", 500)
    assert line.failure.message == "RuntimeError: a bug"
    assert dict(dead.headers)["sluice-error-code"] == b"internal_error"
