"""Creates the service's topics when they are missing, reads the record size each topic takes,
keeps producers from tracking topics they no longer use, and from creating any topic at all."""

from __future__ import annotations

import contextvars
import logging
import time
import weakref
from collections import Counter
from typing import ClassVar

import aiokafka.client
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.metadata import MetadataRequest

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
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create each missing topic (with topic `configs`, e.g. retention.ms); returns the names it
    created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="sluice-admin", **(security or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(n, partitions, replication, topic_configs=configs or {}) for n in missing]
        )
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


async def topic_error(client: aiokafka.client.AIOKafkaClient, topic: str) -> KafkaError | None:
    """What the broker says of `topic` (None: it exists and this client may describe it), asked
    without letting a broker that creates topics on demand create it. Raises KafkaError when no
    broker answers."""
    node_id = client.get_random_node()
    if node_id is None:
        await client.force_metadata_update()
        node_id = client.get_random_node()
    response = await client.send(node_id, MetadataRequest([topic], allow_auto_topic_creation=False))
    for entry in response.to_object()["topics"]:
        if entry["topic"] == topic and entry["error_code"] != 0:
            return for_code(entry["error_code"])(topic)
    return None


def never_create_topics(client: aiokafka.client.AIOKafkaClient) -> None:
    """Make every metadata request of `client` (a producer's) ask the broker not to create the
    topics it names. aiokafka asks for a topic's metadata with auto-creation on whenever it
    sends to it or refreshes what it tracks, so on a broker with auto.create.topics.enable a
    reply topic that its run deleted came back at the next refresh."""
    if not _NoAutoCreate.installed:
        _NoAutoCreate.install()
    _NoAutoCreate.clients.add(client)


class _NoAutoCreate:
    """aiokafka's client builds its MetadataRequest inside _metadata_update with the broker's
    default (auto-create on); for the clients registered here it is built with it off."""

    clients: ClassVar[weakref.WeakSet] = weakref.WeakSet()
    allow: ClassVar[contextvars.ContextVar[bool | None]] = contextvars.ContextVar(
        "sluice_allow_auto_topic_creation", default=None
    )
    installed = False

    @classmethod
    def install(cls) -> None:
        update = aiokafka.client.AIOKafkaClient._metadata_update

        async def _metadata_update(client, cluster_metadata, topics):
            if client not in cls.clients:
                return await update(client, cluster_metadata, topics)
            token = cls.allow.set(False)  # read by the MetadataRequest built in this call
            try:
                return await update(client, cluster_metadata, topics)
            finally:
                cls.allow.reset(token)

        def metadata_request(topics=None, allow_auto_topic_creation=None):
            if allow_auto_topic_creation is None:
                allow_auto_topic_creation = cls.allow.get()
            return MetadataRequest(topics, allow_auto_topic_creation)

        aiokafka.client.AIOKafkaClient._metadata_update = _metadata_update
        aiokafka.client.MetadataRequest = metadata_request
        cls.installed = True


REPLY_TOPIC_IDLE_S = 60.0  # a topic no job was answered into for this long is dropped from metadata requests


class RecentTopics:
    """Keeps a producer asking the cluster only for the topics it sent to lately.

    An aiokafka producer refreshes the metadata of every topic it ever sent to, for good: a job's
    reply topic that its run has since deleted would be asked for, and logged as missing at
    ERROR, for as long as the service runs. A topic not sent to for REPLY_TOPIC_IDLE_S is dropped
    from the producer's metadata requests (`keep` never is); a later send adds it back. Until
    then aiokafka's "not found in cluster metadata" for it is expected, and logged at DEBUG.
    """

    def __init__(self, keep: set[str], idle_s: float | None = None) -> None:
        self._keep = set(keep)
        self._idle_s = REPLY_TOPIC_IDLE_S if idle_s is None else idle_s
        self._last_sent: dict[str, float] = {}
        self._next_check = 0.0
        _MissingReplyTopics.install()

    def sent(self, topic: str) -> None:
        if topic not in self._keep and topic not in self._last_sent:
            _MissingReplyTopics.tracked[topic] += 1
        self._last_sent[topic] = time.monotonic()

    def prune(self, producer) -> None:
        """Drop the idle topics from `producer`'s metadata requests (checks at most every few seconds)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + min(5.0, self._idle_s)
        idle = [t for t, at in self._last_sent.items() if now - at > self._idle_s and t not in self._keep]
        if not idle:
            return
        for topic in idle:
            del self._last_sent[topic]
            _MissingReplyTopics.tracked[topic] -= 1
            if _MissingReplyTopics.tracked[topic] <= 0:
                del _MissingReplyTopics.tracked[topic]
        # set_topics with no new topic only narrows what the next refresh asks for
        producer.client.set_topics(self._keep | set(self._last_sent))
        log.debug("no longer tracking the metadata of %s", ", ".join(idle))


class _MissingReplyTopics(logging.Filter):
    """aiokafka.cluster's ERROR for a reply topic a producer still tracks: its run deleted it."""

    tracked: ClassVar[Counter[str]] = Counter()  # reply topics some RecentTopics still tracks
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("aiokafka.cluster").addFilter(cls())
            cls._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Topic %s not found in cluster metadata" and record.args[0] in self.tracked:
            log.debug("reply topic %s is gone (its run deleted it)", record.args[0])
            return False
        return True
