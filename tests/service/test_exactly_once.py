"""Exactly-once delivery: under read_committed every job's result appears once, crash or not."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from engine import EngineConfig, LLMEngine
from service.topics import ensure_topics
from service.transactions import OutRecord, TransactionalDelivery
from tests.service.processes import service_env, start_service, wait_until

pytestmark = pytest.mark.kafka

BODY = {"prompt": "The river", "max_tokens": 8, "ignore_eos": True, "temperature": 0}


def _jobs(ids: list[str]) -> list[tuple[bytes, bytes, list]]:
    return [
        (i.encode(), json.dumps({"custom_id": i, "url": "/v1/completions", "body": BODY}).encode(), [])
        for i in ids
    ]


def _exactly_once(config):
    return msgspec.structs.replace(config, delivery="exactly_once")


async def _committed_keys(kafka, topic: str) -> Counter:
    records = await kafka.read_all(topic, quiet=2.0, isolation_level="read_committed")
    return Counter(r.key.decode() for r in records)


async def _committed_offset(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


async def test_results_and_dead_letters_appear_once_and_offsets_reach_the_end(
    kafka, service_config, run_service
):
    config = _exactly_once(service_config)
    ids = [f"eos-{i}" for i in range(40)]
    await kafka.post(config.jobs_topics[0], [*_jobs(ids), (b"poison", b"{not json", [])])
    async with run_service(config) as service:
        for _ in range(120):
            if sum((await _committed_keys(kafka, config.results_topic)).values()) >= len(ids) + 1:
                break
            await asyncio.sleep(0.5)
        assert service.transactions.num_transactions > 0
    results = await _committed_keys(kafka, config.results_topic)
    (poison_ref,) = set(results) - set(ids)  # no readable custom_id: keyed TOPIC/PARTITION/OFFSET
    assert poison_ref.startswith(f"{config.jobs_topics[0]}/")
    assert results == Counter([*ids, poison_ref])
    dead = await kafka.read_all(config.dlq_topic, isolation_level="read_committed")
    assert [r.value for r in dead] == [b"{not json"]
    topic = config.jobs_topics[0]
    assert await kafka.committed(config.group_id, topic) == await kafka.end_offsets(topic)


async def test_a_result_waits_until_every_job_below_it_is_done(kafka, topic_prefix, kafka_bootstrap):
    """Offsets commit as a contiguous watermark, so a result past a gap stays staged: publishing it
    now would repeat it when the job in the gap is redone after a crash."""
    jobs, results = f"{topic_prefix}.jobs", f"{topic_prefix}.results"
    await ensure_topics(kafka_bootstrap, [jobs, results], partitions=1, replication=1)
    tp = TopicPartition(jobs, 0)
    delivery = TransactionalDelivery(kafka_bootstrap, f"{topic_prefix}-group", "test", "")
    await delivery.assigned({tp})
    try:
        for offset in (0, 2):
            delivery.stage(tp, offset, [OutRecord(results, f"job-{offset}".encode(), b"{}", [])])
        assert await delivery.commit({tp: 1}) == {tp: 1}  # offset 1 is still running
        assert await _committed_keys(kafka, results) == Counter(["job-0"])
        assert delivery.num_staged() == 1

        delivery.stage(tp, 1, [OutRecord(results, b"job-1", b"{}", [])])
        assert await delivery.commit({tp: 3}) == {tp: 3}
        assert await _committed_keys(kafka, results) == Counter(["job-0", "job-1", "job-2"])
        assert await _committed_offset(kafka_bootstrap, f"{topic_prefix}-group", tp) == 3
    finally:
        await delivery.stop()


async def test_a_newer_owner_of_a_partition_fences_the_older_one(kafka, topic_prefix, kafka_bootstrap):
    jobs, results = f"{topic_prefix}.jobs", f"{topic_prefix}.results"
    await ensure_topics(kafka_bootstrap, [jobs, results], partitions=1, replication=1)
    tp = TopicPartition(jobs, 0)
    group = f"{topic_prefix}-group"
    zombie = TransactionalDelivery(kafka_bootstrap, group, "zombie", "")
    owner = TransactionalDelivery(kafka_bootstrap, group, "owner", "")
    try:
        await zombie.assigned({tp})
        await owner.assigned({tp})  # same transactional id: the zombie's producer is fenced
        zombie.stage(tp, 0, [OutRecord(results, b"from-zombie", b"{}", [])])
        assert await zombie.commit({tp: 1}) == {}
        owner.stage(tp, 0, [OutRecord(results, b"from-owner", b"{}", [])])
        assert await owner.commit({tp: 1}) == {tp: 1}
        assert await _committed_keys(kafka, results) == Counter(["from-owner"])
    finally:
        await zombie.stop()
        await owner.stop()


@pytest.mark.slow
async def test_killing_an_instance_mid_burst_still_gives_each_job_one_committed_result(
    kafka, kafka_bootstrap, topic_prefix, service_config, run_service, tiny_checkpoint, tmp_path
):
    c = msgspec.structs.replace(_exactly_once(service_config), topic_partitions=4)
    env = service_env(
        kafka_bootstrap,
        topic_prefix,
        topic_partitions=4,
        delivery="exactly_once",
        commit_interval_ms=c.commit_interval_ms,
        engine={"model": tiny_checkpoint},
    )
    ids = [f"burst-{i}" for i in range(1000)]
    log_path = tmp_path / "victim.log"
    victim = None
    try:
        survivor_engine = LLMEngine(
            EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=256)
        )
        async with run_service(c, engine=survivor_engine):  # creates the 4-partition topics
            victim = start_service(env, log_path)
            await wait_until(lambda: "partitions assigned" in log_path.read_text(), victim, log_path)
            await kafka.post(c.jobs_topics[0], _jobs(ids))
            await kafka.read(c.results_topic, 150, timeout=120)  # both instances are at work
            victim.send_signal(signal.SIGKILL)  # mid-transaction, most likely: the survivor fences it
            victim.wait(timeout=30)
            results: Counter = Counter()
            for _ in range(60):  # the survivor takes the victim's partitions once its session times out
                results = await _committed_keys(kafka, c.results_topic)
                if set(results) == set(ids):
                    break
                await asyncio.sleep(2)
        assert set(results) == set(ids), f"{len(set(ids) - set(results))} jobs never answered"
        assert [k for k, n in results.items() if n > 1] == []
        assert "stopped after" not in log_path.read_text()  # it was killed, not drained
    finally:
        if victim is not None and victim.poll() is None:
            victim.kill()
            victim.wait()


async def test_only_an_assignment_starts_a_partitions_producer_and_one_at_a_time(
    kafka, topic_prefix, kafka_bootstrap
):
    """A commit never starts a producer (it would fence whoever owns the partition now); two
    starts at once (a rebalance and a restart) make one producer at a time, not two that fence
    each other."""
    jobs, results = f"{topic_prefix}.jobs", f"{topic_prefix}.results"
    await ensure_topics(kafka_bootstrap, [jobs, results], partitions=1, replication=1)
    tp = TopicPartition(jobs, 0)
    started = []

    def producer(**options):
        started.append(options["transactional_id"])
        return AIOKafkaProducer(**options)

    delivery = TransactionalDelivery(
        kafka_bootstrap, f"{topic_prefix}-group", "test", "", producer_factory=producer
    )
    try:
        delivery.stage(tp, 0, [OutRecord(results, b"job-0", b"{}", [])])  # not assigned: refused
        assert await delivery.commit({tp: 1}) == {}
        assert started == []
        await asyncio.gather(delivery.assigned({tp}), delivery.assigned({tp}))
        assert started == [delivery.transactional_id(tp)] * 2  # one after the other
        delivery.stage(tp, 0, [OutRecord(results, b"job-0", b"{}", [])])
        assert await delivery.commit({tp: 1}) == {tp: 1}  # the second producer was not fenced
        assert await _committed_keys(kafka, results) == Counter(["job-0"])
    finally:
        await delivery.stop()
