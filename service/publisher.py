"""ResultPublisher: results, error results and dead letters, each acknowledged by the broker.

The producer is idempotent with acks=all, so a retried send never doubles a result within one
producer session. publish() returns only once the broker has acknowledged the record: only then
may the job's offset count as done. A send the broker refuses for good (too large, a topic that
is not there or not ours to write) raises PublishRefused where the caller can do something else
with the job (a `refusable` send: a job's own reply topic); otherwise it is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)

from service.kafka_security import KafkaClientOptions
from service.topics import RecentTopics, never_create_topics, topic_error

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


class PublishRefused(Exception):
    """The broker refused a record for good: retrying the same record cannot succeed."""

    def __init__(self, topic: str, error: Exception) -> None:
        super().__init__(f"the broker refused a record for {topic}: {type(error).__name__}: {error}")
        self.topic = topic
        self.error = error

    @property
    def is_too_large(self) -> bool:
        return isinstance(self.error, MessageSizeTooLargeError | RecordTooLargeError)


class ResultPublisher:
    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        security: KafkaClientOptions | None = None,
        max_request_size: int = 1_048_576,
        keep_topics: Iterable[str] = (),  # the configured topics; others (reply topics) are dropped when idle
        compression_type: str | None = None,  # gzip, snappy, lz4 or zstd; None: uncompressed
    ) -> None:
        self._options = dict(
            compression_type=compression_type,
            bootstrap_servers=bootstrap,
            **(security or {}),
            client_id=f"{client_id}-results",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,  # results of one engine step leave in one request
            request_timeout_ms=30_000,
            max_request_size=max_request_size,
        )
        self._producer = self._new_producer()
        # An idempotent producer numbers its batches per partition; a batch the broker refuses
        # for good leaves a gap that fails every later batch (OutOfOrderSequenceNumber), so the
        # producer is replaced then: a new producer id, numbering from zero.
        self._generation = 0
        self._replacing = asyncio.Lock()
        self._stopping = False
        self._pending: set[asyncio.Future] = set()  # best-effort sends not yet queued
        self._recent = RecentTopics(set(keep_topics))

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)  # queued before stop: sent
        self._stopping = True
        await self._producer.stop()  # flushes what is pending

    def send_nowait(self, topic: str, value: bytes) -> None:
        """Best effort, no acknowledgement awaited (traces): queued now, sent with the next batch."""
        if self._stopping:
            return
        self._recent.sent(topic)
        task = asyncio.ensure_future(self._producer.send(topic, value=value))
        self._pending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("best-effort send failed: %s", task.exception())

    async def check_topic(self, topic: str) -> None:
        """PublishRefused unless the broker knows `topic` and lets this client describe it. Never
        creates it, whatever the broker's auto.create.topics.enable; nor does the producer start
        tracking it (only a send does)."""
        try:
            error = await topic_error(self._producer.client, topic)
        except KafkaError as e:
            error = e
        if error is not None:
            raise PublishRefused(topic, error)

    async def _is_gone(self, topic: str, error: KafkaError) -> bool:
        """After a timeout waiting for `topic`'s metadata: whether the topic is gone (deleted since
        check_topic), which no retry fixes now that nothing creates it again."""
        if not isinstance(error, KafkaTimeoutError):
            return False
        try:
            return isinstance(await topic_error(self._producer.client, topic), UnknownTopicOrPartitionError)
        except KafkaError:
            return False

    def _new_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(**self._options)
        never_create_topics(producer.client)  # a reply topic its run deleted stays deleted
        return producer

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, refusable: bool = False
    ) -> None:
        """Send and wait for the broker's acknowledgement, retrying broker errors until it comes.

        Giving up would leave the job's offset forever unfinished, so a broker outage only
        delays results; shutdown (stop()) is the only way out, and then the job is redone.
        Raises PublishRefused for a record too large for the broker, and, when `refusable`,
        for any error that retrying cannot fix (the topic is missing, invalid or not ours).
        """
        delay = 0.2
        while True:
            generation = self._generation
            try:
                await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
                self._recent.sent(topic)
                self._recent.prune(self._producer)
                return
            except KafkaError as e:
                if self._stopping:
                    raise
                if isinstance(e, OutOfOrderSequenceNumber) or not e.retriable:
                    await self._replace_producer(generation, e)
                if isinstance(e, MessageSizeTooLargeError | RecordTooLargeError) or (
                    refusable and (_is_final(e) or await self._is_gone(topic, e))
                ):
                    raise PublishRefused(topic, e) from None
                log.warning("publishing to %s failed (%s); retrying in %.1fs", topic, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _replace_producer(self, generation: int, error: KafkaError) -> None:
        """A new producer, unless another caller replaced generation `generation` already. The old
        one is stopped in the background: its pending sends fail and are retried on the new one."""
        async with self._replacing:
            if generation != self._generation or self._stopping:
                return
            log.warning("the broker refused a record (%s): starting a new producer", error)
            new = self._new_producer()
            delay = 0.2
            while True:
                try:
                    await new.start()
                    break
                except KafkaError as e:  # the broker is down: as publish() does, wait for it
                    log.warning("starting a new producer failed (%s); retrying in %.1fs", e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            old, self._producer = self._producer, new
            self._generation += 1
        task = asyncio.ensure_future(_stop_quietly(old))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await producer.stop()
    except Exception as e:  # its sends have failed already; nothing left to save
        log.debug("stopping a replaced producer: %s", e)


def _is_final(error: KafkaError) -> bool:
    """Retrying cannot fix it. A missing topic counts (aiokafka already waited for it); a
    timeout does not (the broker may be down for a while)."""
    if isinstance(error, UnknownTopicOrPartitionError):
        return True
    return not error.retriable and not isinstance(error, KafkaTimeoutError)
