"""Where a client's jobs go: the Sluice service through Kafka, or an engine in this process (--local).

`sluice submit`, `sluice label` and `sluice batch` all reach Kafka through KafkaBackend. Both
backends take encoded job lines and hand back encoded result lines, keyed by custom_id. The local
backend runs each job through the service's own JobHandler, so a job is translated, run and
turned into a result line exactly as the service does it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine import AsyncLLMEngine, EngineThread, LLMEngine
from schemas.codec import encode_result
from service.batcher import DynamicBatcher
from service.client.reply_topics import REPLY_TOPIC_CONFIGS
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.kafka_security import KafkaClientOptions
from service.topics import ensure_topics

Results = AsyncIterator[list[tuple[str, bytes]]]  # batches of (custom_id, result line), maybe empty


class MissingTopicError(RuntimeError):
    """The results topic has no partitions: it does not exist (yet)."""


class KafkaBackend:
    """Posts jobs to the jobs topic and reads their result lines, keyed by custom_id.

    Where the results are read from is the one option:
    - `reply_to=True` (label, batch): `results_topic` is the run's own reply topic, named in each
      job's `reply_to` header. The run reads only its own results; results that arrive while the
      command is not running wait there, and a resumed run reads the topic from its start without
      any stored offsets. start() creates it when missing (`created_topics` says whether it did).
    - `reply_to=False` (submit): `results_topic` is the service's results topic. It must exist; it
      is read from its end as start() found it, so only results that come after start() are seen.
    Results are read with isolation_level="read_committed": an exactly-once service's results are
    seen once, those of its aborted transactions never. Only delete_topics() deletes, and only what
    it is given: the caller passes the topics its run created.
    """

    def __init__(
        self,
        bootstrap: str,
        jobs_topic: str,
        results_topic: str,
        reply_to: bool = True,
        replication: int = 1,
        security: KafkaClientOptions | None = None,  # SASL/TLS, as the service's own clients
    ) -> None:
        self.bootstrap = bootstrap
        self.security = security or {}
        self.jobs_topic = jobs_topic
        self.results_topic = results_topic
        self.reply_to = reply_to
        self.replication = replication
        self.created_topics: list[str] = []  # by start(): the reply topic, when it was missing
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Raises MissingTopicError when the service's results topic does not exist (reply_to=False)."""
        if self.reply_to:
            self.created_topics = await ensure_topics(
                self.bootstrap, [self.results_topic], 1, self.replication, self.security, REPLY_TOPIC_CONFIGS
            )
        attempts = 50 if self.reply_to else 1  # a topic just created may take a moment to be seen
        partitions = await _partitions(self.bootstrap, self.results_topic, self.security, attempts)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            **self.security,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            **self.security,
        )
        await self._consumer.start()
        self._consumer.assign(partitions)
        if self.reply_to:
            await self._consumer.seek_to_beginning(*partitions)
        else:
            await self._consumer.seek_to_end(*partitions)
            for tp in partitions:
                await self._consumer.position(tp)  # resolve the end offsets now, before any job is posted

    async def submit(self, jobs: list[tuple[str, bytes]]) -> None:
        """Post the jobs; returns once the broker has acknowledged every one."""
        assert self._producer is not None, "start() first"
        headers = [("content-type", b"application/json")]
        if self.reply_to:
            headers.insert(0, ("reply_to", self.results_topic.encode()))
        sent = [
            await self._producer.send(self.jobs_topic, value=job, key=custom_id.encode(), headers=headers)
            for custom_id, job in jobs
        ]
        await asyncio.gather(*sent)

    async def results(self) -> Results:
        assert self._consumer is not None, "start() first"
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            yield [
                (record.key.decode("utf-8", "replace") if record.key else "", record.value or b"")
                for records in batches.values()
                for record in records
            ]

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        if self._consumer is not None:
            await self._consumer.stop()

    async def delete_topics(self, topics: list[str]) -> None:
        """Delete these topics: only ever ones the run created (`created_topics`, kept in its ledger)."""
        if not topics:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="sluice-run", **self.security)
        await admin.start()
        try:
            await admin.delete_topics(topics)  # errors (e.g. already gone) are in the response
        finally:
            await admin.close()


class LocalBackend:
    """Runs jobs on an engine in this process, at most `max_in_flight` at a time."""

    def __init__(
        self,
        engine: LLMEngine,
        config: ServiceConfig,
        engine_thread: EngineThread | None = None,
        max_in_flight: int = 256,
    ) -> None:
        self.async_engine = AsyncLLMEngine(engine, engine_thread)
        # the service's admission batching, so --local runs batch the same way
        batcher = DynamicBatcher(self.async_engine, config.batch_max_size, config.batch_max_wait_ms)
        self.handler = JobHandler(config, batcher, engine)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._done: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._offset = 0

    async def start(self) -> None:
        self.async_engine.start()
        await self.handler.start()

    async def submit(self, jobs: list[tuple[str, bytes]]) -> None:
        """Start the jobs; waits while `max_in_flight` jobs are running (memory stays bounded)."""
        for _, job in jobs:
            await self._slots.acquire()
            self._offset += 1  # the job's place, as the service names a job by where it was consumed
            task = asyncio.create_task(self._run(job, int(time.time() * 1000), f"local/0/{self._offset}"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def results(self) -> Results:
        while True:
            try:
                first = await asyncio.wait_for(self._done.get(), timeout=0.5)
            except TimeoutError:
                yield []
                continue
            batch = [first]
            while not self._done.empty():
                batch.append(self._done.get_nowait())
            yield batch

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.handler.stop()
        await self.async_engine.stop()

    async def _run(self, job: bytes, timestamp_ms: int, ref: str) -> None:
        try:
            outcome = await self.handler.handle(job, [], timestamp_ms, ref)
            self._done.put_nowait((outcome.result.custom_id, encode_result(outcome.result)))
        finally:
            self._slots.release()


async def _partitions(
    bootstrap: str, topic: str, security: KafkaClientOptions, attempts: int
) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="sluice-run", **security)
    await admin.start()
    try:
        for attempt in range(attempts):
            (description,) = await admin.describe_topics([topic])
            if not description.get("error_code") and (partitions := description.get("partitions")):
                return [TopicPartition(topic, p["partition"]) for p in partitions]
            if attempt + 1 < attempts:
                await asyncio.sleep(0.1)
    finally:
        await admin.close()
    raise MissingTopicError(f"topic {topic!r} has no partitions")
