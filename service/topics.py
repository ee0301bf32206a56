"""Creates the service's topics when they are missing; reads the record size each topic takes."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

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


async def max_message_bytes(
    bootstrap: str, names: list[str], security: KafkaClientOptions | None = None
) -> dict[str, int]:
    """Each topic's `max.message.bytes` (the largest record batch it takes), where the broker
    says; topics it does not describe (missing, or not ours to describe) are left out."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="sluice-admin", **(security or {}))
    await admin.start()
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, n, {"max.message.bytes": None}) for n in names]
        responses = await admin.describe_configs(resources)
    except KafkaError as e:
        log.warning("cannot read the topics' max.message.bytes (%s)", e)
        return {}
    finally:
        await admin.close()
    limits = {}
    for response in responses:
        for error_code, _, _, topic, configs in response.resources:
            for name, value, *_ in configs if error_code == 0 else ():
                if name == "max.message.bytes" and value is not None:
                    limits[topic] = int(value)
    return limits
