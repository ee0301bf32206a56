"""A run's reply topic over its lifetime: created with a retention, deleted when the run is complete,
and swept by a later run once abandoned.

A run that stops early (idle timeout, Ctrl-C, a crash) keeps its reply topic when jobs it posted
are still unanswered: the service answers them there, and a rerun of the same command reads them.
Answers nobody collects expire with the topic's `retention.ms` (REPLY_RETENTION_MS); a topic whose
every record has expired is abandoned (no run can resume from it), and the next `sluice label` or
`sluice batch` deletes it. Only topics named as runs name them by default,
`<results_topic>.label-<12 hex>` or `.batch-<12 hex>`, are ever swept: a topic given with
--reply-topic or named by --run-id is left alone.
"""

from __future__ import annotations

import re

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from service.kafka_security import KafkaClientOptions

REPLY_RETENTION_MS = 7 * 24 * 3600 * 1000  # a week: answers left uncollected longer expire
REPLY_TOPIC_CONFIGS = {"retention.ms": str(REPLY_RETENTION_MS)}


def is_default_reply_topic(topic: str, results_topic: str) -> bool:
    """Named as a run names its reply topic when given neither --reply-topic nor --run-id."""
    return re.fullmatch(rf"{re.escape(results_topic)}\.(label|batch)-[0-9a-f]{{12}}", topic) is not None


async def sweep_abandoned(bootstrap: str, results_topic: str, security: KafkaClientOptions) -> list[str]:
    """Delete the default-named reply topics whose records have all expired; returns their names."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="sluice-run", **security)
    await admin.start()
    try:
        candidates = [t for t in await admin.list_topics() if is_default_reply_topic(t, results_topic)]
        if not candidates:
            return []
        partitions = {
            d["topic"]: [TopicPartition(d["topic"], p["partition"]) for p in d["partitions"]]
            for d in await admin.describe_topics(candidates)
        }
        abandoned = await _all_records_expired(bootstrap, partitions, security)
        if abandoned:
            await admin.delete_topics(abandoned)
        return abandoned
    finally:
        await admin.close()


async def _all_records_expired(
    bootstrap: str, partitions: dict[str, list[TopicPartition]], security: KafkaClientOptions
) -> list[str]:
    """The topics that held records and hold none now: their start offset caught up with their end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **security)
    await consumer.start()
    try:
        expired = []
        for topic, tps in partitions.items():
            if not tps:
                continue
            begin, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
            if all(begin[tp] == end[tp] for tp in tps) and any(end[tp] > 0 for tp in tps):
                expired.append(topic)
        return expired
    finally:
        await consumer.stop()
