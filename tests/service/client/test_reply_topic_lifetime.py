"""A run's reply topic does not outlive its use: deleted when no answer can come any more, kept
for a rerun while jobs await answers, and swept by a later run once its answers have expired."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from service.client.backends import KafkaBackend
from service.client.command import end_reply_topic
from service.client.ledger import RunLedger
from service.client.reply_topics import REPLY_RETENTION_MS, sweep_abandoned
from service.topics import ensure_topics

pytestmark = pytest.mark.kafka


async def _answer(bootstrap: str, topic: str, expire: bool = False) -> None:
    """One answer into `topic`; `expire`: then drop it, as retention does once it is old enough."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    await producer.send_and_wait(topic, b"{}", key=b"run/0")
    await producer.stop()
    if expire:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(1)})
        await admin.close()


async def test_only_default_named_reply_topics_whose_answers_all_expired_are_swept(
    kafka, kafka_bootstrap, topic_prefix
):
    results = f"{topic_prefix}.results"

    def run_topic(kind: str) -> str:
        return f"{results}.{kind}-{uuid.uuid4().hex[:12]}"

    abandoned, fresh, in_use, named = (
        run_topic("label"),
        run_topic("batch"),
        run_topic("label"),
        f"{results}.mine",
    )
    await ensure_topics(kafka_bootstrap, [abandoned, fresh, in_use, named], 1, 1)
    await _answer(kafka_bootstrap, abandoned, expire=True)
    await _answer(kafka_bootstrap, in_use)
    await _answer(kafka_bootstrap, named, expire=True)  # --run-id/--reply-topic names: never swept
    assert await sweep_abandoned(kafka_bootstrap, results, {}) == [abandoned]
    topics = await kafka.topic_names()
    assert abandoned not in topics and {fresh, in_use, named} <= topics


async def test_a_run_creates_its_reply_topic_with_a_retention(kafka_bootstrap, topic_prefix):
    topic = f"{topic_prefix}.results.label-0123456789ab"
    backend = KafkaBackend(kafka_bootstrap, f"{topic_prefix}.jobs", topic, reply_to=True)
    try:
        await backend.start()
    finally:
        await backend.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    assert configs["retention.ms"] == str(REPLY_RETENTION_MS)


@pytest.mark.parametrize(
    ("posted", "answered", "kept"),
    [
        ({}, set(), False),  # stopped (Ctrl-C) before any job was posted
        ({"0": 1, "1": 1}, {"0", "1"}, False),  # every posted job answered; rows left to post
        ({"0": 1, "1": 1}, {"0"}, True),  # a job awaits its answer: a rerun collects it
    ],
)
async def test_a_run_that_stops_early_keeps_its_reply_topic_only_while_jobs_await_answers(
    kafka, kafka_bootstrap, topic_prefix, posted, answered, kept, capsys
):
    topic = f"{topic_prefix}.results.label-0123456789ab"
    backend = KafkaBackend(kafka_bootstrap, f"{topic_prefix}.jobs", topic, reply_to=True)
    await backend.start()
    await backend.stop()
    ledger = RunLedger(None, "label-0123456789ab", Counter(posted), list(backend.created_topics))
    await end_reply_topic(backend, ledger, answered, is_complete=False)
    assert (topic in await kafka.topic_names()) == kept
    assert ("stays for the 1 unanswered jobs" in capsys.readouterr().err) == kept
