"""Between a revoke and the next assignment, at-least-once: aiokafka still reports the old
assignment and its position while the group rejoins. The three-broker chaos soak lost 64 jobs
there: a fetch in that window started the partition's next tracking at the old position, past
the jobs in flight that the revoke had aborted; the next assignment read them again from the
committed offset, took them for consumed already, and committed past them unanswered."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import TopicPartition

from service.consumer import JobConsumer
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka


async def test_a_fetch_between_revoke_and_reassignment_never_commits_past_the_aborted_jobs(
    kafka, topic_prefix
):
    topic, group = f"{topic_prefix}.jobs", f"{topic_prefix}-group"
    jobs, consumer = await _consumer_of_jobs(kafka, topic, group)
    try:
        assert len(await _fetch_all(consumer, len(jobs))) == len(jobs)  # consumed, none done: all in flight
        tp = TopicPartition(topic, 0)

        # what aiokafka does as a rebalance begins: the listener's revoke, while its assignment
        # (and the position 20 in it) stays until the group has rejoined
        await consumer._consumer._subscription.listener.on_partitions_revoked({tp})
        assert consumer.assignment == {tp} and await consumer._consumer.position(tp) == len(jobs)
        assert await consumer.fetch(100) == []
        await consumer.commit()
    finally:
        await consumer.stop()
    # the aborted jobs stay uncommitted: the partition's next owner redoes all of them
    assert (await kafka.committed(group, topic))[0] in (None, 0)


async def test_a_position_read_across_a_rebalance_never_starts_the_next_assignment_past_the_aborted_jobs(
    kafka, topic_prefix
):
    topic, group = f"{topic_prefix}.jobs", f"{topic_prefix}-group"
    jobs, consumer = await _consumer_of_jobs(kafka, topic, group)
    tp = TopicPartition(topic, 0)
    listener = consumer._consumer._subscription.listener
    try:
        assert len(await _fetch_all(consumer, len(jobs))) == len(jobs)  # all in flight, none done
        # handed straight back with every job aborted: the partition has no tracking until a record
        await listener.on_partitions_revoked({tp})
        await listener.on_partitions_assigned({tp})

        # The next fetch reads the position (20, nothing to fetch up to there) in a task of its
        # own; before that task runs, the group rebalances again: revoked, handed back, and the
        # new assignment reads the committed offset (none: the beginning). The position read
        # belongs to the assignment that is gone.
        real_position = consumer._consumer.position

        async def position_across_a_rebalance(partition):
            consumer._consumer.position = real_position
            position = await real_position(partition)
            await listener.on_partitions_revoked({tp})
            consumer._consumer.seek(tp, 0)
            await listener.on_partitions_assigned({tp})
            return position

        consumer._consumer.position = position_across_a_rebalance
        assert await consumer.fetch(100) == []
        assert consumer._consumer.position is real_position  # the rebalance did happen in there

        # the new assignment reads every aborted job again, and commits nothing past them
        assert len(await _fetch_all(consumer, len(jobs))) == len(jobs)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (await kafka.committed(group, topic))[0] in (None, 0)


async def _consumer_of_jobs(kafka, topic: str, group: str) -> tuple[list, JobConsumer]:
    """20 jobs on a new one-partition topic, and a started consumer of it (the commit loop idle)."""
    await ensure_topics(kafka.bootstrap, [topic], 1, 1)
    jobs = [(f"j{i}".encode(), json.dumps({"custom_id": f"j{i}"}).encode(), []) for i in range(20)]
    await kafka.post(topic, jobs)
    consumer = JobConsumer(kafka.bootstrap, [topic], group, "sluice", commit_interval_ms=60_000)
    await consumer.start()
    return jobs, consumer


async def _fetch_all(consumer: JobConsumer, expected: int) -> list:
    fetched = []
    for _ in range(100):
        fetched += await consumer.fetch(100)
        if len(fetched) >= expected:
            break
        await asyncio.sleep(0.05)
    return fetched
