"""Hostile records on the real broker: each ends as a result or an error result plus a dead letter,
the jobs after it are answered, and the partition's committed offset reaches its end."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.codec import decode_result
from service.limits import JobLimits
from tests.service.hostile import RawRecord, post_raw
from tests.service.test_template_sandbox import MEMORY_BOMB, NESTED_LOOP

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
    await _create_topic(kafka, allowed, {})  # Sluice never creates a reply topic (test_reply_topics.py)
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


async def _read_answers(kafka, topic: str, count: int, delivery: str) -> list:
    """`count` records of `topic` as a reader of the mode sees them (read_committed for exactly-once)."""
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    for _ in range(60):
        records = await kafka.read_all(topic, quiet=1.0, isolation_level=isolation)
        if len(records) >= count:
            return records
    raise AssertionError(f"{topic}: fewer than {count} records")


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_failed_job_with_600k_empty_headers_gets_a_dead_letter_that_fits(
    kafka, service_config, run_service, delivery
):
    # 600,000 empty headers are 1.2 MB of framing and 0 bytes of keys and values: a dead letter
    # that copied them would be refused by the client and the broker (and, exactly-once, fail
    # its partition's transaction at every retry)
    c = msgspec.structs.replace(service_config, delivery=delivery)
    jobs_topic = c.jobs_topics[0]
    await _create_topic(kafka, jobs_topic, {"max.message.bytes": "2000000"})
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=2_000_000)
    await producer.start()
    try:
        await producer.send_and_wait(
            jobs_topic, b"{not json", key=b"headers", headers=[("", b"")] * 600_000, partition=0
        )
        await producer.send_and_wait(jobs_topic, job("canary"), key=b"canary", partition=0)
    finally:
        await producer.stop()
    async with run_service(c) as service:
        lines = [decode_result(r.value) for r in await _read_answers(kafka, c.results_topic, 2, delivery)]
        (dead,) = await _read_answers(kafka, c.dlq_topic, 1, delivery)
        await wait_for_commits(kafka, c.group_id, jobs_topic)
        failures = dict(service.transactions.consecutive_failures) if service.transactions else {}
    results = {line.custom_id: line for line in lines}  # a job with no custom_id: its record's place
    assert results[f"{jobs_topic}/0/0"].failure.code == "invalid_encoding"
    assert not results["canary"].is_error
    headers = dict(dead.headers)
    assert headers["sluice-error-code"] == b"invalid_encoding"
    assert headers["sluice-dropped"].startswith(b"599936 of the job's headers")  # 64 copied at most
    assert len(dead.headers) < 100
    assert set(failures.values()) <= {0}  # no transaction was refused


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_result_too_large_for_its_reply_topic_becomes_an_error_and_the_partition_goes_on(
    kafka, service_config, run_service, delivery, caplog
):
    c = msgspec.structs.replace(service_config, delivery=delivery)
    small = f"{c.results_topic}.small"  # takes records of up to 4 kB
    await _create_topic(kafka, small, {"max.message.bytes": "4000"})
    big = job("big", max_tokens=10, logprobs=20, ignore_eos=True)  # a result of ~6 kB
    reply = [("reply_to", small.encode())]
    await kafka.post(c.jobs_topics[0], [(b"big", big, reply), (b"canary", job("canary"), reply)])
    async with run_service(c) as service:
        (error,) = await _read_answers(kafka, c.results_topic, 1, delivery)
        (canary,) = await _read_answers(kafka, small, 1, delivery)
        (dead,) = await _read_answers(kafka, c.dlq_topic, 1, delivery)
        await wait_for_commits(kafka, c.group_id, c.jobs_topics[0])
        transactions = service.transactions
        failures = dict(transactions.consecutive_failures) if transactions else {}
        metrics = service.metrics.render().decode()
    line = decode_result(error.value)
    assert (line.custom_id, line.failure.code) == ("big", "result_too_large")
    assert "the broker refused the result as too large" in line.failure.message
    assert decode_result(canary.value).custom_id == "canary"
    assert dict(dead.headers)["sluice-error-code"] == b"result_too_large"
    if delivery == "exactly_once":  # one transaction was refused, then the partition went on
        refusals = [r.getMessage() for r in caplog.records if "redone as an error result" in r.getMessage()]
        assert len(refusals) == 1 and "MessageSizeTooLargeError" in refusals[0]
        assert transactions.num_transactions > 0 and set(failures.values()) == {0}
        assert "sluice_consecutive_failed_transactions{" in metrics


def chat_job(custom_id: str, chat_template: str | None = None) -> bytes:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    if chat_template is not None:
        body["chat_template"] = chat_template
    return json.dumps({"custom_id": custom_id, "url": "/v1/chat/completions", "body": body}).encode()


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_hostile_chat_templates_get_error_results_and_the_jobs_beside_them_are_answered(
    kafka, service_config, run_service, delivery
):
    limits = JobLimits(allow_job_chat_template=True, chat_template_timeout_s=1.0)
    c = msgspec.structs.replace(service_config, delivery=delivery, limits=limits)
    own = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    records = [
        RawRecord(chat_job("loop", NESTED_LOOP), key=b"loop"),
        RawRecord(job("ok-1"), key=b"ok-1"),
        RawRecord(chat_job("bomb", MEMORY_BOMB), key=b"bomb"),
        RawRecord(chat_job("ok-2", own), key=b"ok-2"),
        RawRecord(chat_job("ok-3"), key=b"ok-3"),
    ]
    await post_raw(kafka.bootstrap, c.jobs_topics[0], 0, records)  # one partition, one batch
    async with run_service(c) as service:
        lines = [decode_result(r.value) for r in await _read_answers(kafka, c.results_topic, 5, delivery)]
        dead = await _read_answers(kafka, c.dlq_topic, 2, delivery)
        await wait_for_commits(kafka, c.group_id, c.jobs_topics[0])
        assert service.is_live() and not service.engine_failure
        metrics = service.metrics.render().decode()
    assert "sluice_chat_template_renders_killed 2.0" in metrics  # the loop's and the bomb's processes
    results = {line.custom_id: line for line in lines}
    assert {custom_id: line.is_error for custom_id, line in results.items()} == {
        "loop": True,
        "ok-1": False,
        "bomb": True,
        "ok-2": False,
        "ok-3": False,
    }
    loop, bomb = results["loop"].response.body.error, results["bomb"].response.body.error
    assert (loop.code, loop.param, bomb.code, bomb.param) == ("limit_exceeded", "chat_template") * 2
    assert "took longer than this service's limit of 1s" in loop.message
    assert "needed more than this service's limit of" in bomb.message
    assert sorted(r.key for r in dead) == [b"bomb", b"loop"]


async def test_a_render_stuck_past_the_drain_timeout_does_not_hold_the_services_stop(
    kafka, service_config, run_service
):
    limits = JobLimits(allow_job_chat_template=True, chat_template_timeout_s=3600.0)
    c = msgspec.structs.replace(service_config, drain_timeout_s=0.5, limits=limits)
    await post_raw(kafka.bootstrap, c.jobs_topics[0], 0, [RawRecord(chat_job("loop", NESTED_LOOP))])
    async with run_service(c) as service:
        for _ in range(300):
            if service._tasks:  # the job is in flight: its template is rendering
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert service._tasks and service.is_live()  # the render holds no thread of the service's
        stopping = time.monotonic()
    assert time.monotonic() - stopping < c.drain_timeout_s + 10
    # uncommitted: the partition's next owner redoes the job
    assert not (await kafka.committed(c.group_id, c.jobs_topics[0])).get(0)
