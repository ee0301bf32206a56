"""Creates the service's topics when they are missing."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from service.kafka_security import KafkaClientOptions

log = logging.getLogger(__name__)


class TopicCreationError(RuntimeError):
    pass


async def ensure_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication: int,
    security: KafkaClientOptions | None = None,
) -> list[str]:
    """Create each missing topic; returns the names it created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="sluice-admin", **(security or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        response = await admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
        created = []
        for topic, code, message in response.topic_errors:
            if code == 0:
                created.append(topic)
            elif code != TopicAlreadyExistsError.errno:  # another instance may have created it first
                raise TopicCreationError(f"cannot create topic {topic!r}: {message or code}")
        if created:
            log.info("created topics %s (%d partitions)", ", ".join(created), partitions)
        return created
    finally:
        await admin.close()
