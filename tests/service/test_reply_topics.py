"""Reply topics come and go with the runs that name them: the service stops asking for a topic
it no longer answers into, so a run that deleted its topic leaves no trace in the service."""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError

from schemas.codec import decode_result
from service.publisher import PublishRefused, ResultPublisher
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka

BODY = {"prompt": "The river", "max_tokens": 2, "temperature": 0}


def _job(custom_id: str, reply_to: str | None = None) -> tuple[bytes, bytes, list]:
    value = json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": BODY}).encode()
    return custom_id.encode(), value, [("reply_to", reply_to.encode())] if reply_to else []


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_deleted_reply_topic_is_not_asked_for_once_it_is_idle(
    delivery, kafka, kafka_bootstrap, service_config, run_service, caplog, monkeypatch
):
    monkeypatch.setattr("service.topics.REPLY_TOPIC_IDLE_S", 0.5)
    config = msgspec.structs.replace(service_config, delivery=delivery)
    jobs, finished_run, next_run = (
        config.jobs_topics[0],
        f"{config.results_topic}.run-1",
        f"{config.results_topic}.run-2",
    )
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    await ensure_topics(kafka_bootstrap, [finished_run, next_run], 1, 1)
    caplog.set_level(logging.ERROR, logger="aiokafka")
    async with run_service(config):
        await kafka.post(jobs, [_job("a", finished_run)])
        await kafka.read(finished_run, 1)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        await admin.delete_topics([finished_run])  # the run is complete: its command deletes the topic
        await admin.close()
        await asyncio.sleep(1.0)  # some time later (REPLY_TOPIC_IDLE_S), an answer into the results topic...
        await kafka.post(jobs, [_job("b")])
        await kafka.read(config.results_topic, 1)
        await kafka.post(jobs, [_job("c"), _job("d", next_run)])  # ...and a new run's first job
        answered = [r.key for r in await kafka.read_all(next_run, isolation_level=isolation)]
    assert answered == [b"d"]
    assert [r.message for r in caplog.records if finished_run in r.getMessage()] == []


async def _delete_topic(bootstrap: str, topic: str, kafka) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    for _ in range(100):  # deletion reaches the metadata a moment later
        if topic not in await kafka.topic_names():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{topic} was not deleted")


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_missing_or_deleted_reply_topic_gets_an_error_result_and_is_never_created(
    delivery, kafka, kafka_bootstrap, service_config, run_service
):
    # the local broker creates topics on demand (auto.create.topics.enable=true): checking a
    # reply topic, sending to one or refreshing its metadata must not be such a demand
    config = msgspec.structs.replace(service_config, delivery=delivery)
    jobs, missing, deleted = (
        config.jobs_topics[0],
        f"{config.results_topic}.never-made",
        f"{config.results_topic}.run-1",
    )
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    await ensure_topics(kafka_bootstrap, [deleted], 1, 1)
    async with run_service(config) as service:
        await kafka.post(jobs, [_job("to-missing", missing), _job("first", deleted)])
        (first,) = await kafka.read(deleted, 1)
        await _delete_topic(kafka_bootstrap, deleted, kafka)
        await kafka.post(jobs, [_job("after-delete", deleted)])
        refused = {
            r.key: decode_result(r.value) for r in await _read_n(kafka, config.results_topic, 2, isolation)
        }
        # every producer that sent to the deleted topic refreshes its metadata: still not created
        producers = [
            service.publisher._producer,
            *(service.transactions._producers.values() if service.transactions else []),
        ]
        await asyncio.gather(*(p.client.force_metadata_update() for p in producers))
        topics = await kafka.topic_names()

    assert first.key == b"first"
    assert {k: r.failure.code for k, r in refused.items()} == {
        b"to-missing": "invalid_reply_to",
        b"after-delete": "invalid_reply_to",
    }
    assert "UnknownTopicOrPartitionError" in refused[b"to-missing"].failure.message
    assert missing not in topics and deleted not in topics


async def _read_n(kafka, topic: str, count: int, isolation: str) -> list:
    for _ in range(60):
        records = await kafka.read_all(topic, quiet=1.0, isolation_level=isolation)
        if len(records) >= count:
            return records
    raise AssertionError(f"{topic}: fewer than {count} records")


async def test_a_reply_topic_deleted_after_its_check_is_refused_not_waited_for_forever(
    kafka_bootstrap, topic_prefix, kafka
):
    # The topic passed check_topic, then its run deleted it: the producer's wait for its metadata
    # times out (nothing creates it again), and the publisher asks the broker whether it is gone.
    gone = f"{topic_prefix}.results.run-1"
    publisher = ResultPublisher(kafka_bootstrap, "test")
    await publisher.start()
    try:

        async def metadata_wait_timed_out(*args, **kwargs):
            raise KafkaTimeoutError()

        publisher._producer.send_and_wait = metadata_wait_timed_out
        with pytest.raises(PublishRefused, match="KafkaTimeoutError"):
            await asyncio.wait_for(publisher.publish(gone, b"k", b"{}", [], refusable=True), 10)
    finally:
        await publisher.stop()
    assert gone not in await kafka.topic_names()
