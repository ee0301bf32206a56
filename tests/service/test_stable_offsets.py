"""committed_stable(): the committed offsets a new owner of a partition starts from, read with
KIP-447's require_stable, so that a transaction of the previous owner still settling its offset
commit is waited for instead of read around (service/stable_offsets.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from service.stable_offsets import UnstableOffsets, committed_stable
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka


@pytest.fixture
async def group_consumer(kafka, topic_prefix):
    topic, group = f"{topic_prefix}.jobs", f"{topic_prefix}-group"
    await ensure_topics(kafka.bootstrap, [topic], 2, 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    partitions = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer.assign(list(partitions))  # a member of no group generation: its commits are the test's
    yield consumer, group, *partitions
    await consumer.stop()


async def test_a_committed_offset_reads_as_committed_and_a_partition_without_one_as_none(group_consumer):
    consumer, group, committed_tp, uncommitted_tp = group_consumer
    await consumer.commit({committed_tp: OffsetAndMetadata(7, "")})

    offsets = await committed_stable(consumer, group, [committed_tp, uncommitted_tp], timeout_s=10)

    assert offsets == {committed_tp: 7, uncommitted_tp: None}


async def test_a_pending_transactional_commit_is_waited_for_where_an_ordinary_read_sees_the_older_offset(
    kafka, group_consumer
):
    consumer, group, tp, _ = group_consumer
    async with _transaction_committing_9_over_3(kafka, consumer, group, tp) as producer:
        # the previous owner's transaction, not yet committed: what aiokafka's read returns is
        # the offset from before it, the one a new owner must not start from
        assert await consumer.committed(tp) == 3
        with pytest.raises(UnstableOffsets):
            await committed_stable(consumer, group, [tp], timeout_s=1)

        async def commit_soon():
            await asyncio.sleep(0.5)
            await producer.commit_transaction()

        committing = asyncio.create_task(commit_soon())
        assert await committed_stable(consumer, group, [tp], timeout_s=20) == {tp: 9}
        await committing


async def test_an_aborted_transactional_commit_leaves_the_offset_before_it(kafka, group_consumer):
    consumer, group, tp, _ = group_consumer
    async with _transaction_committing_9_over_3(kafka, consumer, group, tp) as producer:
        await producer.abort_transaction()
        assert await committed_stable(consumer, group, [tp], timeout_s=20) == {tp: 3}


@contextlib.asynccontextmanager
async def _transaction_committing_9_over_3(kafka, consumer, group: str, tp: TopicPartition):
    """Offset 3 committed, then a transaction open that commits 9 (the transaction's producer)."""
    await consumer.commit({tp: OffsetAndMetadata(3, "")})
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"{group}.txn")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 9}, group)
        yield producer
    finally:
        await producer.stop()
