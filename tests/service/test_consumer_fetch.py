"""JobConsumer.fetch: a failed fetch gives no records and is retried; it never raises (no broker needed)."""

from __future__ import annotations

from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from service.consumer import JobConsumer


async def test_fetch_errors_give_no_records_and_the_next_fetch_retries(monkeypatch):
    consumer = JobConsumer("127.0.0.1:1", ["jobs"], "group", "sluice", commit_interval_ms=100)
    failures = [
        TopicAuthorizationFailedError("jobs"),
        KafkaConnectionError("broker gone"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ]

    async def getmany(timeout_ms, max_records):
        if failures:
            raise failures.pop(0)
        return {}

    monkeypatch.setattr(consumer._consumer, "getmany", getmany)
    for _ in range(4):
        assert await consumer.fetch(max_records=10, timeout_ms=10) == []
    assert not failures
