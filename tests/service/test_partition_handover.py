"""Exactly-once across a partition's hand-over: the new owner consumes only from the offset
committed once the previous owner's transaction is fenced or finished, and a transaction whose
outcome is unknown is never sent twice."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from service.app import Service
from service.topics import ensure_topics
from service.transactions import OutRecord, TransactionalDelivery
from tests.service.running import running

pytestmark = pytest.mark.kafka

BODY = {"prompt": "The river", "max_tokens": 16, "ignore_eos": True, "temperature": 0}


def _jobs(ids: list[str]) -> list[tuple[bytes, bytes, list]]:
    return [
        (i.encode(), json.dumps({"custom_id": i, "url": "/v1/completions", "body": BODY}).encode(), [])
        for i in ids
    ]


async def _committed_keys(kafka, topic: str) -> Counter:
    records = await kafka.read_all(topic, quiet=1.5, isolation_level="read_committed")
    return Counter(r.key.decode() for r in records)


async def test_a_partition_is_consumed_only_from_the_offset_committed_after_its_fence(
    kafka, kafka_bootstrap, service_config, tiny_engine
):
    """The previous owner's last transaction (a zombie's, or this very process's own commit on
    revoke, whose markers land a moment later) can move the committed offset after the group
    hands the partition over: jobs consumed from the offset read at assignment, before the fence,
    would be answered twice."""
    config = msgspec.structs.replace(service_config, delivery="exactly_once", topic_partitions=1)
    jobs, results = config.jobs_topics[0], config.results_topic
    await ensure_topics(kafka_bootstrap, [jobs, results, config.dlq_topic], partitions=1, replication=1)
    ids = [f"job-{i}" for i in range(10)]
    await kafka.post(jobs, _jobs(ids))
    service = Service(config, tiny_engine)
    tp = TopicPartition(jobs, 0)
    # The previous owner has answered jobs 0-4 in a transaction it has not finished yet.
    previous = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=service.transactions.transactional_id(tp)
    )
    await previous.start()
    await previous.begin_transaction()
    for i in ids[:5]:
        await previous.send(results, key=i.encode(), value=b"{}")
    await previous.send_offsets_to_transaction({tp: 5}, config.group_id)
    fence_may_start = asyncio.Event()

    class SlowToFence(AIOKafkaProducer):
        async def start(self):
            await fence_may_start.wait()  # InitProducerId waits for the previous transaction
            await super().start()

    service.transactions._new_producer = SlowToFence
    try:
        async with running(service):
            while tp not in service.consumer.assignment:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # long enough to consume all ten jobs, were it allowed to
            await previous.commit_transaction()
            fence_may_start.set()
            results_seen: Counter = Counter()
            for _ in range(60):
                results_seen = await _committed_keys(kafka, results)
                if set(results_seen) == set(ids):
                    break
    finally:
        await previous.stop()
    assert results_seen == Counter(ids)


@pytest.mark.slow
async def test_a_partition_revoked_and_handed_straight_back_answers_each_job_once(
    kafka, kafka_bootstrap, service_config, tiny_engine
):
    """A rebalance takes the partition away and gives it back to the same process while jobs are
    in flight, and its producer takes a while to start again: the jobs consumed before the
    revoke are aborted, nothing is consumed until the fence, and each job is answered once."""
    config = msgspec.structs.replace(service_config, delivery="exactly_once", topic_partitions=1)
    jobs, results = config.jobs_topics[0], config.results_topic
    await ensure_topics(kafka_bootstrap, [jobs, results, config.dlq_topic], partitions=1, replication=1)
    ids = [f"job-{i}" for i in range(30)]
    service = Service(config, tiny_engine)
    fence_may_start = asyncio.Event()
    fence_may_start.set()

    class SlowToFence(AIOKafkaProducer):
        async def start(self):
            await fence_may_start.wait()
            await super().start()

    service.transactions._new_producer = SlowToFence
    other_member = AIOKafkaConsumer(
        config.dlq_topic, bootstrap_servers=kafka_bootstrap, group_id=config.group_id
    )
    async with running(service):
        await kafka.post(jobs, _jobs(ids[:15]))
        while not await _committed_keys(kafka, results):  # at work, with jobs in flight
            await asyncio.sleep(0.2)
        fence_may_start.clear()
        # Another member joins the group for another topic: this one's partition is revoked and
        # assigned straight back to it.
        await other_member.start()
        try:
            while not other_member.assignment():
                await other_member.getmany(timeout_ms=100)
            await kafka.post(jobs, _jobs(ids[15:]))
            await asyncio.sleep(1.5)  # long enough to consume every job, were it allowed to
            fence_may_start.set()
            seen: Counter = Counter()
            for _ in range(60):
                seen = await _committed_keys(kafka, results)
                if set(seen) == set(ids):
                    break
        finally:
            await other_member.stop()
    assert seen == Counter(ids)


class _LosesCommitReplies(AIOKafkaProducer):
    """A transaction commits, but its reply is lost (the broker died as it answered)."""

    lose_next_reply = False

    async def commit_transaction(self):
        await super().commit_transaction()
        if _LosesCommitReplies.lose_next_reply:
            _LosesCommitReplies.lose_next_reply = False
            raise KafkaConnectionError("connection lost")


async def test_a_transaction_whose_outcome_is_unknown_is_not_sent_again(kafka, topic_prefix, kafka_bootstrap):
    jobs, results = f"{topic_prefix}.jobs", f"{topic_prefix}.results"
    await ensure_topics(kafka_bootstrap, [jobs, results], partitions=1, replication=1)
    tp = TopicPartition(jobs, 0)
    delivery = TransactionalDelivery(
        kafka_bootstrap, f"{topic_prefix}-group", "test", "", producer_factory=_LosesCommitReplies
    )
    try:
        assert await delivery.assigned({tp}) == {tp}
        delivery.stage(tp, 0, [OutRecord(results, b"job-0", b"{}", [])])
        _LosesCommitReplies.lose_next_reply = True
        assert await delivery.commit({tp: 1}) == {}  # no reply: the outcome is unknown
        assert delivery.restarts() == {tp}  # its work is redone from what the broker committed
        assert delivery.num_staged() == 0
        assert await delivery.commit({tp: 1}) == {}  # nothing is sent before the restart
        assert await delivery.assigned({tp}) == {tp}
        assert delivery.starts_at({tp: 1}) == {tp: 1}  # the committed offset, read after the fence
        delivery.stage(tp, 0, [OutRecord(results, b"job-0", b"{}", [])])  # a stale job: refused
        assert delivery.num_staged() == 0
        delivery.stage(tp, 1, [OutRecord(results, b"job-1", b"{}", [])])
        assert await delivery.commit({tp: 2}) == {tp: 2}
        assert await _committed_keys(kafka, results) == Counter(["job-0", "job-1"])
    finally:
        await delivery.stop()
