"""Jobs from transactional producers: the commit markers they leave on the jobs topic hold no job,
and neither the committed offset nor the lag metric may stop one short of them."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from service.topics import ensure_topics

pytestmark = pytest.mark.kafka

BODY = {"prompt": "The river", "max_tokens": 4, "ignore_eos": True, "temperature": 0}


async def post_in_transaction(bootstrap: str, topic: str, ids: list[str], transactional_id: str) -> None:
    """The jobs in one producer transaction, committed: a commit marker follows them in each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await producer.start()
    try:
        async with producer.transaction():
            for i in ids:
                job = {"custom_id": i, "url": "/v1/completions", "body": BODY}
                await producer.send(topic, key=i.encode(), value=json.dumps(job).encode())
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
    await post_in_transaction(kafka.bootstrap, jobs, ids[:3], f"{topic_prefix}-producer")
    await post_in_transaction(kafka.bootstrap, jobs, ids[3:], f"{topic_prefix}-producer")
    # six jobs and two commit markers, the last one trailing
    assert await kafka.end_offsets(jobs) == {0: len(ids) + 2}

    async with run_service(config) as service:
        results = await kafka.read(config.results_topic, len(ids))

        async def caught_up() -> bool:
            return await kafka.committed(config.group_id, jobs) == {0: len(ids) + 2}

        await wait_for(caught_up)
        assert service.consumer.lag() == 0
    assert sorted(r.key.decode() for r in results) == ids
    assert await kafka.committed(config.group_id, jobs) == await kafka.end_offsets(jobs)
