"""Hostile records on the real broker: each ends as a result or an error result plus a dead letter,
the jobs after it are answered, and the partition's committed offset reaches its end."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

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
    assert results[b"bad-key"].error.code == "invalid_encoding"
    assert "\\xff\\xfebad" in results[b"bad-key"].error.message
    headers = dict(dead.headers)
    assert dead.value == records[2].value and dead.key == b"bad-key"
    assert headers["\\xff\\xfebad"] == b"v" and headers["ok"] == b"1"  # the bad key, escaped
    assert headers["sluice-error-code"] == b"invalid_encoding"
    assert headers["sluice-source-offset"] == b"2"
