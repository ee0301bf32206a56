"""A job posted to the jobs topic comes back as a result line, through the service, on the real broker."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest

from schemas.codec import decode_result
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka

CHAT_JOB = {
    "custom_id": "chat-1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6},
}
COMPLETION_JOB = {
    "custom_id": "completion-1",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0},
}


def _job(doc: dict) -> tuple[bytes, bytes, list]:
    return doc["custom_id"].encode(), json.dumps(doc).encode(), []


def _by_id(records) -> dict:
    return {r.key.decode(): r for r in records}


async def test_posted_jobs_come_back_as_openai_batch_result_lines(kafka, service_config, run_service):
    long_prompt = {**COMPLETION_JOB, "custom_id": "too-long", "body": {"prompt": list(range(5, 400))}}
    msgpack_job = {**COMPLETION_JOB, "custom_id": "msgpack-1"}
    await kafka.post(
        service_config.jobs_topics[0],
        [
            _job(CHAT_JOB),
            _job(COMPLETION_JOB),
            (b"msgpack-1", msgspec.msgpack.encode(msgpack_job), [("content-type", b"application/msgpack")]),
            (
                b"broken",
                b'{"custom_id": "broken", "url": "/v1/completions", "body": {"prompt": "x", "use_beam_search": true}}',
                [],
            ),
            (None, b"\x00 not a job at all", []),
            _job(long_prompt),
        ],
    )
    async with run_service(service_config):
        results = _by_id(await kafka.read(service_config.results_topic, 6))
        dead = await kafka.read(service_config.dlq_topic, 3)

    chat = json.loads(results["chat-1"].value)
    assert chat["custom_id"] == "chat-1" and chat["error"] is None
    assert chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert body["sluice"]["total_ms"] >= body["sluice"]["queue_ms"] >= 0

    completion = decode_result(results["completion-1"].value)
    assert completion.response.body.choices[0].finish_reason == "length"
    assert completion.response.body.usage.completion_tokens == 5

    # A MessagePack job gets a MessagePack result, with the same greedy text.
    assert dict(results["msgpack-1"].headers)["content-type"] == b"application/msgpack"
    packed = decode_result(results["msgpack-1"].value, "application/msgpack")
    assert packed.response.body.choices[0].text == completion.response.body.choices[0].text

    broken = decode_result(results["broken"].value)
    assert broken.response.status_code == 400 and broken.error is None  # kept in the response only
    assert (broken.response.body.error.code, broken.response.body.error.param) == (
        "unsupported_parameter",
        "use_beam_search",
    )
    too_long = decode_result(results["too-long"].value)
    assert too_long.failure.code == "invalid_prompt" and "tokens" in too_long.failure.message
    garbage = next(r for key, r in results.items() if key.startswith(f"{service_config.jobs_topics[0]}/"))
    assert decode_result(garbage.value).error.code == "invalid_encoding"  # no request: no response

    reasons = {dict(r.headers)["sluice-error-code"] for r in dead}
    assert reasons == {b"unsupported_parameter", b"invalid_encoding", b"invalid_prompt"}
    assert all(dict(r.headers)["sluice-source-topic"] == service_config.jobs_topics[0].encode() for r in dead)
    assert b"\x00 not a job at all" in {r.value for r in dead}


async def test_offsets_are_committed_once_results_are_acknowledged(kafka, service_config, run_service):
    jobs_topic = service_config.jobs_topics[0]
    await kafka.post(jobs_topic, [_job({**COMPLETION_JOB, "custom_id": f"c{i}"}) for i in range(6)])
    async with run_service(service_config):
        await kafka.read(service_config.results_topic, 6)
    # Service.stop() drains and commits: the group now stands at the end of every partition.
    assert await kafka.committed(service_config.group_id, jobs_topic) == await kafka.end_offsets(jobs_topic)

    # A restarted instance of the same group resumes after the committed jobs: only the new one runs.
    await kafka.post(jobs_topic, [_job({**COMPLETION_JOB, "custom_id": "after-restart"})])
    async with run_service(service_config):
        await kafka.read(service_config.results_topic, 7)
        await asyncio.sleep(1.0)  # time for any wrongly redone job to show up
    results = await kafka.read_all(service_config.results_topic)
    assert sorted(r.key.decode() for r in results) == sorted([*(f"c{i}" for i in range(6)), "after-restart"])


async def test_reply_to_header_routes_the_result_to_that_topic(kafka, service_config, run_service):
    reply_topic = f"{service_config.results_topic}.replies"  # reply_topics' default allows it
    # its run creates it (sluice label/batch do): Sluice never creates a reply topic
    await ensure_topics(kafka.bootstrap, [reply_topic], 1, 1)
    key, value, _ = _job(CHAT_JOB)
    await kafka.post(service_config.jobs_topics[0], [(key, value, [("reply_to", reply_topic.encode())])])
    async with run_service(service_config):
        (reply,) = await kafka.read(reply_topic, 1)
    assert decode_result(reply.value).custom_id == "chat-1"


async def test_jobs_past_their_deadline_get_deadline_exceeded_without_inference(
    kafka, service_config, run_service
):
    now_ms = int(time.time() * 1000)
    late_header = (
        b"late-header",
        json.dumps({**COMPLETION_JOB, "custom_id": "late-header"}).encode(),
        [("sluice-deadline-ms", str(now_ms - 1000).encode())],
    )
    late_body = {
        **COMPLETION_JOB,
        "custom_id": "late-body",
        "body": {**COMPLETION_JOB["body"], "sluice_deadline_ms": now_ms - 1000},
    }
    in_time = {
        **COMPLETION_JOB,
        "custom_id": "in-time",
        "body": {**COMPLETION_JOB["body"], "sluice_deadline_ms": now_ms + 600_000},
    }
    await kafka.post(service_config.jobs_topics[0], [late_header, _job(late_body), _job(in_time)])
    async with run_service(service_config):
        results = _by_id(await kafka.read(service_config.results_topic, 3))
        dead = await kafka.read(service_config.dlq_topic, 2)
    for custom_id in ("late-header", "late-body"):
        result = decode_result(results[custom_id].value)
        assert result.response is None and result.error.code == "deadline_exceeded", custom_id
        assert "it was not run" in result.error.message
    assert decode_result(results["in-time"].value).error is None
    assert {dict(r.headers)["sluice-error-code"] for r in dead} == {b"deadline_exceeded"}
