"""Trace context flows from a job's producer to its result, and the traces topic holds decodable OTLP spans."""

from __future__ import annotations

import http.server
import json
import threading
from typing import ClassVar

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

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
