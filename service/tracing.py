"""Tracing: one span per job, with children for where its time went, exported as OTLP to Kafka.

The traces topic holds OTLP protobuf ExportTraceServiceRequest messages, which is what the
OpenTelemetry Collector's Kafka receiver reads (its default `otlp_proto` encoding), so any
tracing backend gets Sluice's spans without code of ours. The parent context comes from the
job's W3C `traceparent` header; the result carries the job span's `traceparent`.
Prompt and completion text are never recorded: spans carry counts and timings only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine import RequestMetrics

_PROPAGATOR = TraceContextTextMapPropagator()


class KafkaSpanExporter(SpanExporter):
    """Encodes each batch of finished spans as one ExportTraceServiceRequest and hands the bytes on."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send  # called from the span processor's thread; must not block

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            data = encode_spans(spans).SerializeToString()
        except Exception:  # a span protobuf cannot hold (a time out of range): the others still go
            data = encode_spans([s for s in spans if _encodes(s)]).SerializeToString()
        try:
            self._send(data)
        except Exception:  # traces are best effort: a job never fails for its spans
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class JobTracer:
    def __init__(
        self,
        send: Callable[[bytes], None],
        model_name: str,
        service_name: str = "sluice",
        otlp_endpoint: str = "",
    ) -> None:
        resource = Resource.create({"service.name": service_name, "sluice.model": model_name})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(KafkaSpanExporter(send), schedule_delay_millis=200)
        )
        if otlp_endpoint:
            # Besides the topic: straight to a collector or tracing backend over OTLP/HTTP (protobuf).
            self._provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint), schedule_delay_millis=200)
            )
        self._tracer = self._provider.get_tracer("sluice")
        self._model_name = model_name

    def shutdown(self) -> None:
        """Export what is pending, then stop."""
        self._provider.shutdown()

    def start_job(self, record: ConsumerRecord, start_ms: int, request_id: str = "") -> trace.Span:
        """The job's span, started at `start_ms` (the record's timestamp, if plausible), child of
        its producer's context; `sluice.request_id` is the job's id, its result's
        `response.request_id`, by which a result finds its trace."""
        parent = _extract(record.headers)
        return self._tracer.start_span(
            f"{record.topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=start_ms * 1_000_000,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.kafka.destination.partition": record.partition,
                "messaging.kafka.message.offset": record.offset,
                "sluice.model": self._model_name,
                "sluice.request_id": request_id,
            },
        )

    def record_inference(
        self, job_span: trace.Span, metrics: RequestMetrics, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Children for queue wait, prefill and decode, from the engine's timestamps."""
        start = job_span.start_time  # ns
        arrival = _ns(metrics.arrival_time)
        first = _ns(metrics.first_token_time) if metrics.first_token_time else None
        finished = _ns(metrics.finished_time) if metrics.finished_time else _ns(time.time())
        self._child(job_span, "queue wait", start, max(start, arrival))
        if first is not None:
            self._child(job_span, "prefill", arrival, first)
            self._child(job_span, "decode", first, finished)
        ttft_ms = None if first is None else (first - arrival) / 1e6
        tpot_ms = (
            (finished - first) / 1e6 / (completion_tokens - 1) if first and completion_tokens > 1 else None
        )
        job_span.set_attributes(
            {
                "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": completion_tokens,
                **({"sluice.time_to_first_token_ms": ttft_ms} if ttft_ms is not None else {}),
                **({"sluice.time_per_output_token_ms": tpot_ms} if tpot_ms is not None else {}),
                "sluice.num_preemptions": metrics.num_preemptions,
            }
        )

    def record_admission(self, job_spans: list[trace.Span], batch_size: int) -> None:
        """A span for one admission batch, linked to its jobs' spans (it has many, so links, not a
        parent), and the batch size on each job's span."""
        span = self._tracer.start_span(
            "admit batch",
            links=[trace.Link(s.get_span_context()) for s in job_spans],
            attributes={"sluice.batch.size": batch_size, "sluice.model": self._model_name},
        )
        for job_span in job_spans:
            job_span.set_attribute("sluice.batch_size_at_admission", batch_size)
        span.end()

    def record_publish(self, job_span: trace.Span, started_ns: int) -> None:
        self._child(job_span, "publish", started_ns, time.time_ns(), SpanKind.PRODUCER)

    def end_job(self, job_span: trace.Span, error_code: str | None) -> None:
        if error_code is not None:
            job_span.set_attribute("error.type", error_code)
            job_span.set_status(Status(StatusCode.ERROR, error_code))
        job_span.end()

    def _child(
        self, parent: trace.Span, name: str, start_ns: int, end_ns: int, kind=SpanKind.INTERNAL
    ) -> None:
        span = self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), kind=kind, start_time=start_ns
        )
        span.end(end_time=max(start_ns, end_ns))


def traceparent_headers(span: trace.Span) -> list[tuple[str, bytes]]:
    """The span's context as W3C trace-context headers, for the result record."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return [(key, value.encode()) for key, value in carrier.items()]


_MAX_TRACEPARENT_BYTES = 256  # a W3C traceparent has 55


def copied_traceparent(headers) -> list[tuple[str, bytes]]:
    """The job's first `traceparent` header, for its result when Sluice makes no spans: one, and
    short (a job may carry 500,000 of them, which its result must not)."""
    for key, value in headers or ():
        if key.lower() == "traceparent" and value is not None and len(value) <= _MAX_TRACEPARENT_BYTES:
            return [(key, value)]
    return []


def _extract(headers) -> Context:
    carrier = {k.lower(): v.decode("latin-1") for k, v in headers or () if v is not None}
    return _PROPAGATOR.extract(carrier)


def _encodes(span: ReadableSpan) -> bool:
    try:
        encode_spans([span]).SerializeToString()
    except Exception:
        return False
    return True


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
