"""Trace context flows from a job's producer to its result, and the traces topic holds decodable OTLP spans."""

from __future__ import annotations

import http.server
import json
import threading
from typing import ClassVar

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

pytestmark = pytest.mark.kafka

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN_ID = "00f067aa0ba902b7"
SECRET_PROMPT = "the-secret-prompt-text"


async def test_trace_context_is_propagated_and_spans_reach_the_traces_topic(
    kafka, service_config, run_service
):
    job = {
        "custom_id": "traced-1",
        "url": "/v1/completions",
        "body": {"prompt": SECRET_PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    }
    traceparent = f"00-{TRACE_ID}-{PRODUCER_SPAN_ID}-01".encode()
    await kafka.post(
        service_config.jobs_topics[0],
        [(b"traced-1", json.dumps(job).encode(), [("traceparent", traceparent)])],
    )
    async with run_service(service_config):
        (result,) = await kafka.read(service_config.results_topic, 1)
    # The service stopped: its last spans are exported and flushed.
    records = await kafka.read_all(service_config.traces_topic)
    assert records, "no OTLP records on the traces topic"

    result_traceparent = dict(result.headers)["traceparent"].decode()
    assert result_traceparent.split("-")[1] == TRACE_ID  # same trace as the producer's

    spans, resources, scopes = {}, set(), set()
    for record in records:
        request = ExportTraceServiceRequest.FromString(record.value)
        assert SECRET_PROMPT.encode() not in record.value  # no prompt text in spans
        for resource_spans in request.resource_spans:
            resources.add(
                next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
            )
            for scope_spans in resource_spans.scope_spans:
                scopes.add(scope_spans.scope.name)
                for span in scope_spans.spans:
                    spans[span.name] = span
    assert resources == {"sluice"} and scopes == {"sluice"}
    job_span = spans[f"{service_config.jobs_topics[0]} process"]
    assert job_span.trace_id.hex() == TRACE_ID
    assert job_span.parent_span_id.hex() == PRODUCER_SPAN_ID
    assert result_traceparent.split("-")[2] == job_span.span_id.hex()  # the result points at the job span
    for name in ("queue wait", "prefill", "decode", "publish"):
        assert spans[name].parent_span_id == job_span.span_id, name
        assert spans[name].trace_id == job_span.trace_id
    attributes = {a.key: a.value for a in job_span.attributes}
    assert attributes["gen_ai.usage.output_tokens"].int_value == 5
    assert attributes["gen_ai.usage.input_tokens"].int_value > 0
    assert attributes["sluice.time_to_first_token_ms"].double_value >= 0
    assert attributes["messaging.kafka.message.offset"].int_value == 0
    # issue 30, defect 8: the result's request_id leads to the job's span
    request_id = json.loads(result.value)["response"]["request_id"]
    assert request_id.startswith("req_") and attributes["sluice.request_id"].string_value == request_id
    assert job_span.start_time_unix_nano <= spans["decode"].end_time_unix_nano <= job_span.end_time_unix_nano
    # The admission batch's span links to the jobs it handed to the engine.
    admission = spans["admit batch"]
    assert [(link.trace_id, link.span_id) for link in admission.links] == [
        (job_span.trace_id, job_span.span_id)
    ]
    assert {a.key: a.value for a in admission.attributes}["sluice.batch.size"].int_value == 1
    assert attributes["sluice.batch_size_at_admission"].int_value == 1


class _OtlpReceiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: keeps every ExportTraceServiceRequest it is sent."""

    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        self.received.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


async def test_spans_also_go_to_an_otlp_endpoint_when_one_is_configured(kafka, service_config, run_service):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = msgspec.structs.replace(
        service_config, otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    )
    job = {"custom_id": "otlp-1", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}
    await kafka.post(config.jobs_topics[0], [(b"otlp-1", json.dumps(job).encode(), [])])
    try:
        async with run_service(config):
            await kafka.read(config.results_topic, 1)
    finally:
        server.shutdown()
    names = {
        span.name
        for request in _OtlpReceiver.received
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    }
    assert {f"{config.jobs_topics[0]} process", "queue wait", "prefill", "decode", "publish"} <= names


def _decode_spans(records) -> list[tuple[dict, str, object]]:
    """(resource attributes, scope name, span) for every span of every ExportTraceServiceRequest."""
    decoded = []
    for record in records:
        request = ExportTraceServiceRequest.FromString(record.value)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                decoded.extend((resource, scope_spans.scope.name, s) for s in scope_spans.spans)
    return decoded


async def test_otlp_spans_carry_resource_kinds_parent_links_attributes_and_error_status(
    kafka, service_config, run_service
):
    ok = {"custom_id": "ok", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 3}}
    bad = {"custom_id": "bad", "url": "/v1/completions", "body": {"prompt": "hi", "temperature": 9}}
    await kafka.post(
        service_config.jobs_topics[0],
        [(b"ok", json.dumps(ok).encode(), []), (b"bad", json.dumps(bad).encode(), [])],  # no traceparent
    )
    async with run_service(service_config):
        await kafka.read(service_config.results_topic, 2)
    decoded = _decode_spans(await kafka.read_all(service_config.traces_topic))

    for resource, scope, _ in decoded:
        assert resource["service.name"].string_value == "sluice"
        assert resource["sluice.model"].string_value == "tiny"
        assert resource["telemetry.sdk.language"].string_value == "python"
        assert scope == "sluice"
    spans = [span for _, _, span in decoded]
    process_name = f"{service_config.jobs_topics[0]} process"
    jobs = {
        next(a.value.int_value for a in s.attributes if a.key == "messaging.kafka.message.offset"): s
        for s in spans
        if s.name == process_name
    }
    assert len(jobs) == 2
    for job in jobs.values():
        # A job without a traceparent header starts a trace of its own.
        assert job.parent_span_id == b"" and len(job.trace_id) == 16
        assert job.kind == Span.SpanKind.SPAN_KIND_CONSUMER
        attributes = {a.key: a.value for a in job.attributes}
        assert attributes["messaging.system"].string_value == "kafka"
        assert attributes["messaging.destination.name"].string_value == service_config.jobs_topics[0]
        assert attributes["messaging.kafka.destination.partition"].int_value in (0, 1)
        assert attributes["sluice.model"].string_value == "tiny"
    children = {
        job.span_id: {s.name: s for s in spans if s.parent_span_id == job.span_id} for job in jobs.values()
    }

    good, failed = sorted(jobs.values(), key=lambda s: any(a.key == "error.type" for a in s.attributes))
    steps = children[good.span_id]
    assert set(steps) == {"queue wait", "prefill", "decode", "publish"}
    assert all(s.trace_id == good.trace_id for s in steps.values())
    assert steps["publish"].kind == Span.SpanKind.SPAN_KIND_PRODUCER
    assert steps["prefill"].kind == Span.SpanKind.SPAN_KIND_INTERNAL
    # The children tile the job's time in order: queue wait, prefill, decode, then publish.
    assert steps["queue wait"].start_time_unix_nano == good.start_time_unix_nano
    assert steps["queue wait"].end_time_unix_nano <= steps["prefill"].start_time_unix_nano + 1_000
    assert steps["prefill"].end_time_unix_nano == steps["decode"].start_time_unix_nano
    assert steps["decode"].end_time_unix_nano <= steps["publish"].start_time_unix_nano
    assert steps["publish"].end_time_unix_nano <= good.end_time_unix_nano
    assert good.status.code != Status.StatusCode.STATUS_CODE_ERROR
    good_attributes = {a.key: a.value for a in good.attributes}
    assert good_attributes["gen_ai.usage.output_tokens"].int_value == 3
    assert good_attributes["sluice.time_per_output_token_ms"].double_value > 0

    # The invalid job: an error status and type, a publish child (its error result), no inference.
    assert failed.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert {a.key: a.value for a in failed.attributes}["error.type"].string_value == "invalid_request"
    assert set(children[failed.span_id]) == {"publish"}
    assert failed.trace_id != good.trace_id
