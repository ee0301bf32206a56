"""`make observe` for the tests: deploy/observe/observe.sh up on test topics and free ports, a traced
producer that posts jobs the way an instrumented client would, and small clients of Jaeger's and
Prometheus's HTTP APIs."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.tracing import KafkaSpanExporter
from tests import browser
from tests.service.processes import free_port, service_env

REPO_ROOT = Path(__file__).resolve().parents[2]
OBSERVE = REPO_ROOT / "deploy" / "observe" / "observe.sh"
PRODUCER_SERVICE = "sluice-test-producer"


@dataclass
class ObserveStack:
    """The environment `observe.sh up` ran with, and where its APIs listen."""

    env: dict[str, str]
    jaeger_url: str
    prometheus_url: str

    @property
    def jobs_topic(self) -> str:
        return self.env["SLUICE_JOBS_TOPICS"]

    @property
    def results_topic(self) -> str:
        return self.env["SLUICE_RESULTS_TOPIC"]

    @property
    def traces_topic(self) -> str:
        return self.env["SLUICE_TRACES_TOPIC"]


def observe_env(kafka_bootstrap: str, topic_prefix: str, model: Path, observe_dir: Path) -> dict[str, str]:
    jaeger_port = free_port()
    return {
        **service_env(kafka_bootstrap, topic_prefix, engine={"model": model, "dtype": "float32"}),
        "SLUICE_TOPIC_PARTITIONS": "2",
        "OBSERVE_DIR": str(observe_dir),
        "JAEGER_UI_PORT": str(jaeger_port),
        "JAEGER_GRPC_PORT": str(free_port()),
        "JAEGER_HEALTH_PORT": str(free_port()),
        "JAEGER_KAFKA_GROUP": f"{topic_prefix}-jaeger",
        "PROMETHEUS_PORT": str(free_port()),
        "PROMETHEUS_SCRAPE_INTERVAL": "1s",
    }


def observe(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(OBSERVE), command], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def stack_logs(env: dict[str, str]) -> str:
    """The last lines of each component's log, for a failure message."""
    logs = sorted(Path(env["OBSERVE_DIR"]).glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)


@dataclass
class TracedProducer:
    """A producer instrumented with OpenTelemetry: each job gets a `send` span whose context goes in
    the job's `traceparent` header, and whose span goes to the traces topic as Sluice's spans do."""

    encoded: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": PRODUCER_SERVICE}))
        provider.add_span_processor(SimpleSpanProcessor(KafkaSpanExporter(self.encoded.append)))
        self._tracer = provider.get_tracer("sluice-test-producer")

    def record(self, topic: str, job: dict) -> tuple[tuple[bytes, bytes, list], str, str]:
        """(key, value, headers) of the job, its trace id and its producer span id (hex)."""
        with self._tracer.start_as_current_span(f"{topic} send", kind=SpanKind.PRODUCER) as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            context = span.get_span_context()
        headers = [(k, v.encode()) for k, v in carrier.items()]
        record = (job["custom_id"].encode(), json.dumps(job).encode(), headers)
        return record, trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def get_json(url: str, **params: object) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(url + query, timeout=10) as response:
        return json.loads(response.read())


def jaeger_trace(stack: ObserveStack, trace_id: str) -> list[dict]:
    """The trace's spans (Jaeger's HTTP API), with `process` resolved to its service name and tags
    as a dict; [] while Jaeger has not got it."""
    try:
        data = get_json(f"{stack.jaeger_url}/api/traces/{trace_id}")["data"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise
    spans = []
    for t in data:
        for span in t["spans"]:
            span["service"] = t["processes"][span["processID"]]["serviceName"]
            span["tags"] = {tag["key"]: tag["value"] for tag in span["tags"]}
            spans.append(span)
    return spans


def wait_for(condition, timeout: float, message) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(message() if callable(message) else message)


def promql(stack: ObserveStack, expr: str) -> list[dict]:
    """An instant query's result vector: [{"metric": {...}, "value": float}]."""
    body = get_json(f"{stack.prometheus_url}/api/v1/query", query=expr)
    assert body["status"] == "success", (expr, body)
    assert body["data"]["resultType"] == "vector", (expr, body["data"]["resultType"])
    return [{"metric": r["metric"], "value": float(r["value"][1])} for r in body["data"]["result"]]


def chromium(url: str, *flags: str, timeout: float = 120) -> str:
    """tests.browser.chromium in a 1400x900 window, letting the page's own API calls finish first."""
    return browser.chromium(
        url, "--window-size=1400,900", "--virtual-time-budget=20000", *flags, timeout=timeout
    )
