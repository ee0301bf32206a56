"""Service: wires consumer, job handler, async engine and publisher; runs until told to stop.

A job's way, each stage one module (RecordProcessor.process, service/processing.py, takes one
record from the handler to done):

    JobConsumer.fetch           a record of a jobs topic (backpressure pauses the partitions)
    -> JobHandler.handle        bytes -> schemas/ job -> translate -> (prompt ids, SamplingParams)
    -> DynamicBatcher           admitted with the burst it came in; the engine's thread steps it
    -> AsyncLLMEngine.wait      the engine's RequestOutput -> translate -> result line
    -> OutcomeDelivery          the result (and a dead letter for an error) through the
                                ResultPublisher, or exactly_once a TransactionalDelivery
    -> JobConsumer.done         the partition's watermark moves; offsets commit behind it

Every consumed record ends as exactly one of: a result, an error result plus a dead letter, or
uncommitted (redone by the partition's next owner).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition

from engine import AsyncLLMEngine, EngineDeadError, EngineThread, LLMEngine
from service.backpressure import Backpressure
from service.batcher import Admission, DynamicBatcher
from service.config import ServiceConfig
from service.consumer import JobConsumer
from service.delivery import OutcomeDelivery
from service.http import HealthServer
from service.jobs import JobHandler
from service.kafka_security import KafkaClientOptions, check_login, client_options
from service.metrics import ServiceMetrics
from service.processing import RecordProcessor
from service.publisher import ResultPublisher
from service.routing import ReplyTopics
from service.shutdown import bounded
from service.topics import ensure_topics, max_message_bytes
from service.tracing import JobTracer
from service.transactions import TransactionalDelivery

log = logging.getLogger(__name__)

_REQUEST_HEADROOM = 65_536  # a produce request holds a result plus the request's own framing


class Service:
    def __init__(
        self, config: ServiceConfig, engine: LLMEngine, engine_thread: EngineThread | None = None
    ) -> None:
        """`engine_thread`: the thread that loaded `engine`, to step it on (engine/engine_thread.py)."""
        self.config = config
        self.async_engine = AsyncLLMEngine(engine, engine_thread)
        self.backpressure = Backpressure(
            config.max_in_flight, config.max_in_flight_tokens, config.resume_fraction
        )
        self.batcher = DynamicBatcher(
            self.async_engine, config.batch_max_size, config.batch_max_wait_ms, on_flush=self._admitted
        )
        self.handler = _job_handler(config, self.batcher, self.backpressure, engine)
        self.kafka_security = client_options(config)  # SASL/TLS settings of every Kafka client below
        self.publisher, self.transactions, self.delivery = _delivery(config, self.kafka_security)
        self.consumer = JobConsumer(
            config.kafka_bootstrap,
            config.jobs_topics,
            config.group_id,
            config.client_id,
            config.commit_interval_ms,
            self.kafka_security,
            sink=self.transactions,  # exactly_once: offsets commit in the results' transactions
            max_batch_bytes=config.max_batch_bytes,
        )
        self.consumer.on_revoke = self._abort_partitions
        self.consumer.on_fetch_failure = lambda reason: self.metrics.fetch_failures.labels(reason).inc()
        self.metrics = ServiceMetrics()
        self.processor = RecordProcessor(
            self.handler, self.delivery, self.consumer, self.metrics, self._engine_died
        )
        self._tasks: dict[asyncio.Task, TopicPartition] = {}  # in-flight jobs and their partitions
        self.tracer: JobTracer | None = None
        self._register_metrics()
        self._ready = False
        self.http = HealthServer(
            config.http_host,
            config.http_port,
            self.metrics.render,
            self.is_live,
            lambda: self._ready,
        )
        self.engine_failure: EngineDeadError | None = None  # set when the engine died: stop, exit non-zero
        self._stop: asyncio.Event | None = None

    def is_live(self) -> bool:
        """Liveness: the engine runs, and no task has held the tokenizer thread (which every job
        needs) past tokenizer_stall_s."""
        return self.async_engine.is_running and self.handler.tokenizer_busy_s <= self.config.tokenizer_stall_s

    async def start(self) -> None:
        c = self.config
        await check_login(c.kafka_bootstrap, self.kafka_security)  # a refused login says why, and stops here
        if c.create_topics:
            topics = [*c.jobs_topics, *_written_topics(c)]
            await ensure_topics(
                c.kafka_bootstrap, topics, c.topic_partitions, c.topic_replication, self.kafka_security
            )
        limits = await max_message_bytes(
            c.kafka_bootstrap, [c.results_topic, c.dlq_topic], self.kafka_security
        )
        self.delivery.fit_topics(limits)
        self.async_engine.start()
        await self.handler.start()
        await self.publisher.start()
        if c.traces_enabled:
            loop = asyncio.get_running_loop()
            self.tracer = JobTracer(
                lambda data: loop.call_soon_threadsafe(self.publisher.send_nowait, c.traces_topic, data),
                c.served_model_name,
                otlp_endpoint=c.otlp_endpoint,
            )
            self.processor.tracer = self.tracer
        await self.consumer.start()
        await self.http.start()
        self._ready = True
        log.info(
            "consuming %s as group %r; results to %s", ", ".join(c.jobs_topics), c.group_id, c.results_topic
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume and process jobs until `stop` is set (or the engine dies); pause past the high-water mark."""
        self._stop = stop
        while not stop.is_set():
            try:
                await self._consume_once()
            except Exception:  # a bug in one round must not end the consume loop
                log.exception("consuming failed; going on in 1s")
                await asyncio.sleep(1.0)

    async def _consume_once(self) -> None:
        backpressure = self.backpressure
        if self.transactions is not None:
            backpressure.staged = self.transactions.num_staged()  # results held for a transaction
        action = backpressure.update()
        if backpressure.is_paused:
            self.consumer.pause()  # every time: partitions assigned meanwhile must pause too
        if action is not None:
            log.info(
                "%s consuming: %d jobs, %d tokens in flight", action, backpressure.jobs, backpressure.tokens
            )
            if action == "resume":
                self.consumer.resume()
        # Keep polling while paused: the group drops a member that stops polling.
        fetched = await self.consumer.fetch(max_records=max(1, backpressure.free_jobs), timeout_ms=100)
        for record, generation in fetched:
            backpressure.add(jobs=1)
            self.metrics.jobs_consumed.labels(record.topic).inc()
            task = asyncio.create_task(self.processor.process(record, generation))
            self._tasks[task] = TopicPartition(record.topic, record.partition)
            task.add_done_callback(self._forget_task)

    async def stop(self) -> None:
        """Finish in-flight jobs (up to drain_timeout_s), commit, and close everything."""
        if self._tasks:
            log.info(
                "draining %d in-flight jobs (up to %.0fs)", len(self._tasks), self.config.drain_timeout_s
            )
            _, pending = await asyncio.wait(list(self._tasks), timeout=self.config.drain_timeout_s)
            for task in pending:
                task.cancel()  # left uncommitted: the partition's next owner redoes these jobs
            await asyncio.gather(*pending, return_exceptions=True)
        await self.consumer.stop()  # the last commit (exactly_once: the last transactions)
        if self.transactions is not None:
            await bounded(self.transactions.stop(), "closing the transactional producers")
        if self.tracer is not None:
            # exports the last spans (through the loop)
            await bounded(asyncio.to_thread(self.tracer.shutdown), "exporting the last spans")
            await asyncio.sleep(0.05)
        await bounded(self.publisher.stop(), "flushing the publisher")
        await self.handler.stop()
        await self.async_engine.stop()
        await self.http.stop()
        log.info("stopped after %d results (%d errors)", *self.metrics.jobs_answered)

    async def _abort_partitions(self, revoked: set[TopicPartition]) -> None:
        """Revoked partitions' in-flight jobs are cancelled (aborted in the engine), not published:
        the partitions' next owner redoes them from the last commit."""
        tasks = [task for task, tp in self._tasks.items() if tp in revoked and not task.done()]
        if tasks:
            log.info("aborting %d in-flight jobs of revoked partitions", len(tasks))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _admitted(self, batch: list[Admission]) -> None:
        self.metrics.admission_batch_size.observe(len(batch))
        if self.tracer is not None:
            self.tracer.record_admission([a.tag for a in batch if a.tag is not None], len(batch))

    def _register_metrics(self) -> None:
        bp, m = self.backpressure, self.metrics
        for topic in self.config.jobs_topics:  # at 0 from the first scrape: rate() then sees the first jobs
            m.jobs_consumed.labels(topic)
        m.engine(self.async_engine.stats)
        m.gauge("sluice_jobs_in_flight", "Jobs consumed, not yet published", lambda: bp.jobs)
        m.gauge("sluice_tokens_in_flight", "Prompt + requested output tokens in flight", lambda: bp.tokens)
        m.gauge(
            "sluice_results_staged", "Exactly-once: results waiting for their transaction", lambda: bp.staged
        )
        m.gauge(
            "sluice_consumer_paused", "1 while backpressure pauses the partitions", lambda: int(bp.is_paused)
        )
        m.gauge("sluice_consumer_lag", "Records of assigned partitions not yet done", self.consumer.lag)
        handler = self.handler
        m.gauge(
            "sluice_tokenizer_busy_seconds",
            "How long the tokenizer thread's current task has run (0: idle); /healthz fails past tokenizer_stall_s",
            lambda: handler.tokenizer_busy_s,
        )
        m.gauge(
            "sluice_chat_template_renders_killed",
            "Renders of jobs' own chat templates killed since start (past their time or memory limit, or abandoned)",
            lambda: handler.num_template_renders_killed,
        )
        m.partition_gauge(
            "sluice_jobs_open_transaction_records",
            "Records of the jobs partition past its last stable offset (high watermark - LSO): held back "
            "from Sluice by an open producer transaction",
            self.consumer.open_transactions,
        )
        m.partition_gauge(
            "sluice_jobs_last_stable_offset",
            "The jobs partition's last stable offset: read_committed readers see the records below it",
            self.consumer.last_stable_offsets,
        )
        if (transactions := self.transactions) is not None:
            m.partition_gauge(
                "sluice_consecutive_failed_transactions",
                "Exactly-once: transactions of the partition that failed in a row (0 after one commits)",
                lambda: dict(transactions.consecutive_failures),
            )

    def _forget_task(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        self.backpressure.remove(jobs=1)

    def _engine_died(self, error: EngineDeadError) -> None:
        if self.engine_failure is None:
            self.engine_failure = error
            log.error("the engine is gone (%s): stopping; unfinished jobs stay uncommitted", error)
        if self._stop is not None:
            self._stop.set()


def _written_topics(config: ServiceConfig) -> list[str]:
    """The topics Sluice writes to whatever the jobs say (reply topics come and go)."""
    return [config.results_topic, config.dlq_topic, config.traces_topic]


def _job_handler(
    config: ServiceConfig, batcher: DynamicBatcher, backpressure: Backpressure, engine: LLMEngine
) -> JobHandler:
    reply_topics = ReplyTopics(
        config.reply_topics, config.results_topic, reserved=[*config.jobs_topics, *_written_topics(config)]
    )
    return JobHandler(config, batcher, engine, backpressure, reply_topics)


def _delivery(
    config: ServiceConfig, security: KafkaClientOptions
) -> tuple[ResultPublisher, TransactionalDelivery | None, OutcomeDelivery]:
    """The publisher, the transactional producers (exactly_once: results wait for their
    partition's next transaction instead of the publisher) and the delivery over both."""
    written = _written_topics(config)
    compression = None if config.compression_type == "none" else config.compression_type
    publisher = ResultPublisher(
        config.kafka_bootstrap,
        config.client_id,
        security,
        max_request_size=config.max_result_bytes + _REQUEST_HEADROOM,
        keep_topics=written,
        compression_type=compression,
    )
    transactions = None
    max_result_bytes = config.max_result_bytes
    if config.delivery == "exactly_once":
        transactions = TransactionalDelivery(
            config.kafka_bootstrap,
            config.group_id,
            config.client_id,
            config.transactional_id_prefix,
            security=security,
            keep_topics=written,
            compression_type=compression,
        )
        max_result_bytes = min(
            max_result_bytes, 1_000_000
        )  # these producers keep aiokafka's 1 MiB max_request_size
    delivery = OutcomeDelivery(
        publisher, transactions, config.results_topic, config.dlq_topic, max_result_bytes
    )
    return publisher, transactions, delivery
