"""ResultPublisher: results, error results and dead letters, each acknowledged by the broker.

The producer is idempotent with acks=all, so a retried send never doubles a result within one
producer session. publish() returns only once the broker has acknowledged the record: only then
may the job's offset count as done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from service.kafka_security import KafkaClientOptions
from service.topics import RecentTopics

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


class ResultPublisher:
    def __init__(
        self,
        bootstrap: str,
        client_id: str,
        security: KafkaClientOptions | None = None,
        keep_topics: Iterable[str] = (),  # the configured topics; others (reply topics) are dropped when idle
    ) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **(security or {}),
            client_id=f"{client_id}-results",
            acks="all",
            enable_idempotence=True,
            linger_ms=5,  # results of one engine step leave in one request
            request_timeout_ms=30_000,
        )
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

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        """Send and wait for the broker's acknowledgement, retrying broker errors until it comes.

        Giving up would leave the job's offset forever unfinished, so a broker outage only
        delays results; shutdown (stop()) is the only way out, and then the job is redone.
        """
        delay = 0.2
        while True:
            try:
                await self._producer.send_and_wait(topic, value=value, key=key, headers=headers)
                self._recent.sent(topic)
                self._recent.prune(self._producer)
                return
            except KafkaError as e:
                if self._stopping:
                    raise
                log.warning("publishing to %s failed (%s); retrying in %.1fs", topic, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
