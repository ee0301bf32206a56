"""RecordProcessor: one consumed record's way to exactly one end.

    its span (when traces are on) -> JobHandler.handle -> OutcomeDelivery.deliver
    -> ServiceMetrics.count -> JobConsumer.done (the partition's watermark may move past it)

A job's own failure is an error result from the handler; a fault of Sluice's own still gets an
error result here; an engine that is gone leaves the record uncommitted (its partition's next
owner redoes it) and stops the service; so does a job that outlived its partition's assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from engine import EngineDeadError
from service.consumer import JobConsumer
from service.delivery import OutcomeDelivery
from service.jobs import JobHandler, Outcome
from service.lenient_records import UndecodableBatch, undecodable_batch
from service.metrics import ServiceMetrics
from service.records import job_timestamp_ms, record_ref
from service.tracing import JobTracer, copied_traceparent, traceparent_headers
from service.translate import new_request_id

log = logging.getLogger(__name__)


class RecordProcessor:
    def __init__(
        self,
        handler: JobHandler,
        delivery: OutcomeDelivery,
        consumer: JobConsumer,
        metrics: ServiceMetrics,
        on_engine_dead: Callable[[EngineDeadError], None],
    ) -> None:
        self._handler = handler
        self._delivery = delivery
        self._consumer = consumer
        self._metrics = metrics
        self._on_engine_dead = on_engine_dead
        self.tracer: JobTracer | None = None  # set once the service has started, when traces are on

    async def process(self, record: ConsumerRecord, generation: int) -> None:
        """`generation`: the assignment of the record's partition it was consumed under (JobConsumer.fetch)."""
        if (failure := undecodable_batch(record)) is not None:
            await self._dead_letter_batch(record, failure, generation)
            return
        timestamp_ms = job_timestamp_ms(record, int(time.time() * 1000))
        # the job's id, made here so that its span, its logs and its result all carry it
        request_id = new_request_id()
        tracer = self.tracer
        span = tracer.start_job(record, timestamp_ms, request_id) if tracer else None
        try:
            outcome = await self._handle_and_deliver(record, generation, timestamp_ms, span, request_id)
        except asyncio.CancelledError:
            if span is not None:
                tracer.end_job(span, "aborted")
            raise
        except EngineDeadError as e:
            # No result and no commit: the partition's next owner redoes the job. An engine that
            # is gone would turn every job into an error result, so this instance stops.
            if span is not None:
                tracer.end_job(span, "engine_dead")
            self._on_engine_dead(e)
            return
        except Exception as e:  # a fault of Sluice's own: the job still gets an error result
            log.exception("job %s (%s) failed in the service", record_ref(record), request_id)
            outcome = await self._delivery.deliver_internal_error(
                record, e, self._is_current(record, generation), request_id
            )
            if outcome is None:  # not even that: left uncommitted, its next owner redoes it
                if span is not None:
                    tracer.end_job(span, "internal_error")
                return
            self._metrics.count(outcome, timestamp_ms)
            self._consumer.done(record, generation)
        if span is not None:
            tracer.end_job(span, outcome.result.failure.code if outcome.is_error else None)

    async def _handle_and_deliver(
        self, record: ConsumerRecord, generation: int, timestamp_ms: int, span, request_id: str
    ) -> Outcome:
        outcome = await self._handler.handle(
            record.value or b"", record.headers, timestamp_ms, record_ref(record), span, request_id
        )
        if span is not None:
            if (out := outcome.output) is not None:
                self.tracer.record_inference(span, out.metrics, len(out.prompt_token_ids), len(out.token_ids))
            trace_headers = traceparent_headers(span)  # same trace as the job's producer, this job's span
        else:
            trace_headers = copied_traceparent(record.headers)
        publish_start = time.time_ns()
        delivered = await self._delivery.deliver(
            record, outcome, trace_headers, self._is_current(record, generation)
        )
        if delivered is None:
            # Its partition was revoked (or restarted) and maybe assigned here again since: that
            # assignment redoes it from the committed offset. Only a job that outlived its abort
            # gets here; staging it could publish its result twice.
            log.warning(
                "job %s (%s) outlived its partition's assignment: dropped", record_ref(record), request_id
            )
            return outcome
        if delivered.is_error:
            log.warning("job %s (%s) failed: %s", record_ref(record), request_id, delivered.result.failure)
        if span is not None:
            self.tracer.record_publish(span, publish_start)
        self._metrics.count(delivered, timestamp_ms)
        self._consumer.done(record, generation)
        return delivered

    async def _dead_letter_batch(
        self, record: ConsumerRecord, failure: UndecodableBatch, generation: int
    ) -> None:
        """A batch that could not be read: a dead letter naming it, then its offsets are done."""
        try:
            delivered = await self._delivery.deliver_undecodable(
                record, failure, self._is_current(record, generation)
            )
        except Exception:  # left uncommitted: read again (and dead-lettered) by the next owner
            log.exception("the dead letter of an undecodable batch at %s failed", record_ref(record))
            return
        if delivered:
            self._metrics.dead_letters.inc()
            self._consumer.done(record, generation)

    def _is_current(self, record: ConsumerRecord, generation: int) -> Callable[[], bool]:
        """Whether the record's partition is still in the assignment the job was consumed under."""
        return lambda: self._consumer.is_current(record, generation)
