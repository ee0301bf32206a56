"""KafkaBackend against the real broker: which topics it creates, reads and may delete."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.client.backends import KafkaBackend, MissingTopicError
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka


async def _keys_until(backend: KafkaBackend, last: str, timeout: float = 30) -> list[str]:
    """Every result key read until `last` arrives."""
    keys: list[str] = []
    deadline = time.monotonic() + timeout
    results = backend.results()
    try:
        while last not in keys:
            assert time.monotonic() < deadline, f"no result {last!r} within {timeout}s; got {keys}"
            keys += [custom_id for custom_id, _ in await anext(results)]
    finally:
        await results.aclose()
    return keys


async def test_a_reply_topic_that_already_existed_is_not_counted_as_created(kafka_bootstrap, topic_prefix):
    existing, fresh = f"{topic_prefix}.existing", f"{topic_prefix}.fresh"
    await ensure_topics(kafka_bootstrap, [existing], 1, 1)
    for topic, created in ((existing, []), (fresh, [fresh])):
        backend = KafkaBackend(kafka_bootstrap, f"{topic_prefix}.jobs", topic, reply_to=True)
        try:
            await backend.start()
            assert backend.created_topics == created
        finally:
            await backend.stop()


async def test_the_service_results_topic_must_exist_and_is_never_created(
    kafka, kafka_bootstrap, topic_prefix
):
    backend = KafkaBackend(kafka_bootstrap, f"{topic_prefix}.jobs", f"{topic_prefix}.results", reply_to=False)
    try:
        with pytest.raises(MissingTopicError):
            await backend.start()
    finally:
        await backend.stop()
    assert f"{topic_prefix}.results" not in await kafka.topic_names()


async def test_results_of_aborted_transactions_are_never_read(kafka_bootstrap, topic_prefix):
    topic = f"{topic_prefix}.results"
    await ensure_topics(kafka_bootstrap, [topic], 1, 1)
    backend = KafkaBackend(kafka_bootstrap, f"{topic_prefix}.jobs", topic, reply_to=False)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic_prefix}-tx")
    await producer.start()
    try:
        await _send_in_transaction(producer, topic, b"before-start", commit=True)  # before start(): not read
        # The coordinator writes the commit marker after commit_transaction() returns; until it lands
        # the committed end (the LSO) is still before the record, and start() would begin there.
        await _wait_for_committed_end(kafka_bootstrap, topic, 2)  # the record and its marker
        await backend.start()
        await _send_in_transaction(producer, topic, b"aborted", commit=False)
        await _send_in_transaction(producer, topic, b"committed", commit=True)
        assert await _keys_until(backend, "committed") == ["committed"]
    finally:
        await producer.stop()
        await backend.stop()


async def _wait_for_committed_end(bootstrap: str, topic: str, offset: int, timeout: float = 30) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        deadline = time.monotonic() + timeout
        while (await consumer.end_offsets([partition]))[partition] < offset:
            assert time.monotonic() < deadline, f"{topic}'s committed end never reached {offset}"
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()


async def _send_in_transaction(producer: AIOKafkaProducer, topic: str, key: bytes, commit: bool) -> None:
    await producer.begin_transaction()
    await producer.send_and_wait(topic, key=key, value=b"{}")
    await (producer.commit_transaction() if commit else producer.abort_transaction())
