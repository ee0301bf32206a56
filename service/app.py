"""Service: wires consumer, job handler, async engine and publisher; runs until told to stop.

A job's way, each stage one module:

    JobConsumer.fetch           a record of a jobs topic (backpressure pauses the partitions)
    -> JobHandler.handle        bytes -> schemas/ job -> translate -> (prompt ids, SamplingParams)
    -> DynamicBatcher           admitted with the burst it came in; the engine's thread steps it
    -> AsyncLLMEngine.wait      the engine's RequestOutput -> translate -> result line
    -> ResultPublisher / TransactionalDelivery   the result (and a dead letter for an error)
    -> JobConsumer.done         the partition's watermark moves; offsets commit behind it

Every consumed record ends as exactly one of: a result, an error result plus a dead letter, or
uncommitted (redone by the partition's next owner).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from engine import AsyncLLMEngine, EngineDeadError, EngineThread, LLMEngine
from service.backpressure import Backpressure
from service.batcher import Admission, DynamicBatcher
from service.config import ServiceConfig
from service.consumer import JobConsumer
from service.delivery import OutcomeDelivery
from service.http import HealthServer
from service.jobs import JobHandler, Outcome
from service.kafka_security import check_login, client_options
from service.limits import job_limits
from service.metrics import ServiceMetrics
from service.publisher import ResultPublisher
from service.reasoning import resolve_reasoning_parser
from service.records import job_timestamp_ms, record_ref
from service.routing import ReplyTopics
from service.shutdown import bounded
from service.topics import ensure_topics, max_message_bytes
from service.tracing import JobTracer, traceparent_headers
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
        self.handler = JobHandler(
            self.batcher,
            config.served_model_name,
            config.default_max_tokens,
            self.backpressure,
            model_aliases=config.model_aliases,
            unknown_fields=config.unknown_fields,
            limits=job_limits(config, engine.max_model_len),
            reply_topics=ReplyTopics(
                config.reply_topics,
                config.results_topic,
                reserved=[*config.jobs_topics, config.dlq_topic, config.traces_topic],
            ),
            embedding_pooling=config.embedding_pooling,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=resolve_reasoning_parser(
                config.reasoning_parser, getattr(engine, "architectures", ())
            ),
        )
        self.kafka_security = client_options(config)  # SASL/TLS settings of every Kafka client below
        configured = {config.results_topic, config.dlq_topic, config.traces_topic}  # reply topics come and go
        self.publisher = ResultPublisher(
            config.kafka_bootstrap,
            config.client_id,
            self.kafka_security,
            max_request_size=config.max_result_bytes + _REQUEST_HEADROOM,
            keep_topics=configured,
        )
        # exactly_once: results wait for their partition's next transaction instead of the publisher
        self.transactions: TransactionalDelivery | None = None
        if config.delivery == "exactly_once":
            self.transactions = TransactionalDelivery(
                config.kafka_bootstrap,
                config.group_id,
                config.client_id,
                config.transactional_id_prefix,
                security=self.kafka_security,
                keep_topics=configured,
            )
        # exactly_once: the transactional producers keep aiokafka's 1 MiB max_request_size
        max_result_bytes = (
            config.max_result_bytes if self.transactions is None else min(config.max_result_bytes, 1_000_000)
        )
        self.delivery = OutcomeDelivery(
            self.publisher, self.transactions, config.results_topic, config.dlq_topic, max_result_bytes
        )
        self.consumer = JobConsumer(
            config.kafka_bootstrap,
            config.jobs_topics,
            config.group_id,
            config.client_id,
            config.commit_interval_ms,
            self.kafka_security,
            sink=self.transactions,
        )
        self._tasks: dict[asyncio.Task, TopicPartition] = {}  # in-flight jobs and their partitions
        self.tracer: JobTracer | None = None
        self.metrics = ServiceMetrics()
        for topic in config.jobs_topics:  # at 0 from the first scrape: rate() then sees the first jobs
            self.metrics.jobs_consumed.labels(topic)
        self._register_gauges()
        self._ready = False
        self.http = HealthServer(
            config.http_host,
            config.http_port,
            self.metrics.render,
            lambda: self.async_engine.is_running,
            lambda: self._ready,
        )
        self.consumer.on_revoke = self._abort_partitions
        self.engine_failure: EngineDeadError | None = None  # set when the engine died: stop, exit non-zero
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        c = self.config
        await check_login(c.kafka_bootstrap, self.kafka_security)  # a refused login says why, and stops here
        if c.create_topics:
            topics = [*c.jobs_topics, c.results_topic, c.dlq_topic, c.traces_topic]
            await ensure_topics(
                c.kafka_bootstrap, topics, c.topic_partitions, c.topic_replication, self.kafka_security
            )
        limits = await max_message_bytes(
            c.kafka_bootstrap, [c.results_topic, c.dlq_topic], self.kafka_security
        )
        self.delivery.fit_topics(limits)
        self.async_engine.start()
        await self.publisher.start()
        if c.traces_enabled:
            loop = asyncio.get_running_loop()
            self.tracer = JobTracer(
                lambda data: loop.call_soon_threadsafe(self.publisher.send_nowait, c.traces_topic, data),
                c.served_model_name,
                otlp_endpoint=c.otlp_endpoint,
            )
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
            task = asyncio.create_task(self._process(record, generation))
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

    def _count(self, record: ConsumerRecord, timestamp_ms: int, outcome: Outcome) -> None:
        m = self.metrics
        m.latency.observe(max(0.0, time.time() - timestamp_ms / 1000))
        if outcome.is_error:
            m.jobs_failed.labels(outcome.result.failure.code).inc()
            m.dead_letters.inc()
        else:
            m.jobs_completed.inc()
        if (out := outcome.output) is not None:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.output_tokens.inc(sum(len(s.token_ids) for s in out.samples or [out]))  # every choice's
            m.queue_wait.observe(max(0.0, out.metrics.arrival_time - timestamp_ms / 1000))
            if (ttft := _seconds(out.metrics.first_token_time, out.metrics.arrival_time)) is not None:
                m.ttft.observe(ttft)

    def _admitted(self, batch: list[Admission]) -> None:
        self.metrics.admission_batch_size.observe(len(batch))
        if self.tracer is not None:
            self.tracer.record_admission([a.tag for a in batch if a.tag is not None], len(batch))

    def _register_gauges(self) -> None:
        bp, m = self.backpressure, self.metrics
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

    def _forget_task(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        self.backpressure.remove(jobs=1)

    async def _process(self, record: ConsumerRecord, generation: int) -> None:
        """`generation`: the assignment of the record's partition it was consumed under (JobConsumer.fetch)."""
        timestamp_ms = job_timestamp_ms(record, int(time.time() * 1000))
        span = self.tracer.start_job(record, timestamp_ms) if self.tracer else None
        try:
            outcome = await self._handle_and_publish(record, generation, timestamp_ms, span)
        except asyncio.CancelledError:
            if span is not None:
                self.tracer.end_job(span, "aborted")
            raise
        except EngineDeadError as e:
            # No result and no commit: the partition's next owner redoes the job. An engine that
            # is gone would turn every job into an error result, so this instance stops.
            if span is not None:
                self.tracer.end_job(span, "engine_dead")
            self._engine_died(e)
            return
        except Exception as e:  # a fault of Sluice's own: the job still gets an error result
            log.exception("job %s failed in the service", record_ref(record))
            outcome = await self.delivery.deliver_internal_error(
                record, e, self._is_current(record, generation)
            )
            if outcome is None:  # not even that: left uncommitted, its next owner redoes it
                if span is not None:
                    self.tracer.end_job(span, "internal_error")
                return
            self._count(record, timestamp_ms, outcome)
            self.consumer.done(record, generation)
        if span is not None:
            self.tracer.end_job(span, outcome.result.failure.code if outcome.is_error else None)

    def _is_current(self, record: ConsumerRecord, generation: int) -> Callable[[], bool]:
        """Whether the record's partition is still in the assignment the job was consumed under."""
        return lambda: self.consumer.is_current(record, generation)

    def _engine_died(self, error: EngineDeadError) -> None:
        if self.engine_failure is None:
            self.engine_failure = error
            log.error("the engine is gone (%s): stopping; unfinished jobs stay uncommitted", error)
        if self._stop is not None:
            self._stop.set()

    async def _handle_and_publish(
        self, record: ConsumerRecord, generation: int, timestamp_ms: int, span
    ) -> Outcome:
        outcome = await self.handler.handle(
            record.value or b"", record.headers, timestamp_ms, record_ref(record), tag=span
        )
        if span is not None:
            if outcome.output is not None:
                out = outcome.output
                self.tracer.record_inference(span, out.metrics, len(out.prompt_token_ids), len(out.token_ids))
            trace_headers = traceparent_headers(span)  # same trace as the job's producer, this job's span
        else:
            trace_headers = [(k, v) for k, v in record.headers or () if k.lower() == "traceparent"]
        publish_start = time.time_ns()
        delivered = await self.delivery.deliver(
            record, outcome, trace_headers, self._is_current(record, generation)
        )
        if delivered is None:
            # Its partition was revoked (or restarted) and maybe assigned here again since: that
            # assignment redoes it from the committed offset. Only a job that outlived its abort
            # gets here; staging it could publish its result twice.
            log.warning("job %s outlived its partition's assignment: dropped", record_ref(record))
            return outcome
        outcome = delivered
        if outcome.is_error:
            log.warning(
                "job %s/%d/%d failed: %s",
                record.topic,
                record.partition,
                record.offset,
                outcome.result.failure,
            )
        if span is not None:
            self.tracer.record_publish(span, publish_start)
        self._count(record, timestamp_ms, outcome)
        self.consumer.done(record, generation)
        return outcome


def _seconds(later: float | None, earlier: float) -> float | None:
    return None if later is None else max(0.0, later - earlier)
