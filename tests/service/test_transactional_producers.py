"""Jobs from transactional producers: the commit markers they leave on the jobs topic hold no job,
and neither the committed offset nor the lag metric may stop one short of them."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from service.topics import ensure_topics

pytestmark = pytest.mark.kafka

BODY = {"prompt": "The river", "max_tokens": 4, "ignore_eos": True, "temperature": 0}


async def post_in_transaction(
    bootstrap: str, topic: str, ids: list[str], transactional_id: str, commit: bool = True
) -> None:
    """The jobs in one producer transaction, committed (or aborted): a commit (abort) marker
    follows them in each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in ids:
            job = {"custom_id": i, "url": "/v1/completions", "body": BODY}
            await producer.send_and_wait(topic, key=i.encode(), value=json.dumps(job).encode())
        await (producer.commit_transaction() if commit else producer.abort_transaction())
    finally:
        await producer.stop()


async def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "not met in time"
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_the_committed_offset_reaches_the_partition_end_past_a_trailing_commit_marker(
    kafka, service_config, run_service, topic_prefix, delivery
):
    config = msgspec.structs.replace(service_config, delivery=delivery, topic_partitions=1)
    jobs = config.jobs_topics[0]
    await ensure_topics(kafka.bootstrap, [jobs], partitions=1, replication=1)
    ids = [f"txn-{i}" for i in range(6)]
    producer = f"{topic_prefix}-producer"
    await post_in_transaction(kafka.bootstrap, jobs, ids[:3], producer)
    await post_in_transaction(kafka.bootstrap, jobs, ["aborted-0", "aborted-1"], producer, commit=False)
    await post_in_transaction(kafka.bootstrap, jobs, ids[3:], producer)
    # six jobs, two aborted ones and three markers, the last one trailing
    end = len(ids) + 2 + 3
    assert await kafka.end_offsets(jobs) == {0: end}

    async with run_service(config) as service:
        results = await kafka.read(config.results_topic, len(ids))

        async def caught_up() -> bool:
            return await kafka.committed(config.group_id, jobs) == {0: end}

        await wait_for(caught_up)
        assert service.consumer.lag() == 0
    assert sorted(r.key.decode() for r in results) == ids  # the aborted jobs never ran
    assert len(await kafka.read_all(config.results_topic, quiet=0.5)) == len(ids)
    assert await kafka.committed(config.group_id, jobs) == await kafka.end_offsets(jobs)


async def test_an_open_producer_transaction_shows_in_the_gauge_until_it_commits(
    kafka, service_config, run_service, topic_prefix
):
    config = msgspec.structs.replace(service_config, topic_partitions=1)
    jobs = config.jobs_topics[0]
    await ensure_topics(kafka.bootstrap, [jobs], partitions=1, replication=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"{topic_prefix}-open")
    await producer.start()
    try:
        async with run_service(config) as service:
            await producer.begin_transaction()
            for i in ("open-0", "open-1"):
                job = {"custom_id": i, "url": "/v1/completions", "body": BODY}
                await producer.send_and_wait(jobs, key=i.encode(), value=json.dumps(job).encode())

            def gap_is(value: float):
                async def check() -> bool:
                    return _partition_gauge(service, "sluice_jobs_open_transaction_records", jobs) == value

                return check

            await wait_for(gap_is(2.0))  # two records the open transaction holds back
            assert _partition_gauge(service, "sluice_jobs_last_stable_offset", jobs) == 0.0
            await producer.commit_transaction()
            await wait_for(gap_is(0.0))
            assert _partition_gauge(service, "sluice_jobs_last_stable_offset", jobs) == 3.0  # past the marker
            results = await kafka.read(config.results_topic, 2)
        assert sorted(r.key.decode() for r in results) == ["open-0", "open-1"]
    finally:
        await producer.stop()


def _partition_gauge(service, name: str, topic: str) -> float | None:
    """The gauge's value for partition 0 of `topic` in the service's /metrics text."""
    for family in text_string_to_metric_families(service.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"topic": topic, "partition": "0"}:
                return sample.value
    return None
