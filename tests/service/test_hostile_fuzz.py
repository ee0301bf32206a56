"""Fuzz: generated hostile records posted to a running service on the real broker.

Each example is one record (random bytes, bad header keys and values, deep nesting, huge fields,
odd timestamps, hostile reply_to, hostile chat templates, control tokens in every rendered field) followed in the same batch (uncompressed or in any codec), on
the same partition, by a canary job; the example passes when the canary is answered. At the end every record has exactly one
result line, every error result its dead letter, every partition's committed offset equals its
end offset, and the service is still running. In both delivery modes: at-least-once, and
exactly-once read as a read_committed reader reads it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
import uuid

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import decode_result
from service.app import Service
from service.limits import JobLimits
from tests.service.hostile import RawRecord, post_raw
from tests.service.test_hostile_records import wait_for_commits
from tests.service.test_template_sandbox import MEMORY_BOMB, NESTED_LOOP, OUTPUT_BOMB

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

NUM_EXAMPLES = 300
NOW_MS = int(time.time() * 1000)


def _job(custom_id, **body) -> dict:
    return {
        "custom_id": custom_id,
        "url": "/v1/completions",
        "body": {"prompt": "hi", "max_tokens": 2, **body},
    }


def _chat_job(custom_id, *messages, **body) -> dict:
    messages = [{"role": "user", "content": "hi"}, *messages]
    return {
        "custom_id": custom_id,
        "url": "/v1/chat/completions",
        "body": {"messages": messages, "max_tokens": 2, **body},
    }


def _responses_job(custom_id, **body) -> dict:
    return {
        "custom_id": custom_id,
        "url": "/v1/responses",
        "body": {"input": "hi", "max_output_tokens": 2, **body},
    }


def _deep_call(depth: int) -> dict:
    arguments = "[" * depth + "]" * depth
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}


def _deep_schema(depth: int) -> dict:
    schema: dict = {}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _call(name: str, arguments: str) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}


def _deep(depth: int) -> bytes:
    return (
        b'{"custom_id": "deep", "url": "/v1/completions", "body": {"prompt": '
        + b"[" * depth
        + b"]" * depth
        + b"}}"
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "prompt",
        "max_tokens",
        "temperature",
        "stop",
        "stop_token_ids",
        "logprobs",
        "n",
        "seed",
        "top_k",
        "guided_choice",
        "structured_outputs",
        "priority",
        "sluice_deadline_ms",
        "top_p",
        "repetition_penalty",
        "presence_penalty",
        "logit_bias",
        "messages",
        "response_format",
        # /v1/responses
        "input",
        "instructions",
        "max_output_tokens",
        "include",
        "top_logprobs",
        "text",
        "tools",
        "tool_choice",
        "reasoning",
        "metadata",
        "previous_response_id",
        "store",
        "background",
        "chat_template",
        "chat_template_kwargs",
        "documents",
    ]
)
mutated_jobs = st.builds(
    lambda custom_id, url, body: json.dumps({"custom_id": custom_id, "url": url, "body": body}).encode(),
    st.one_of(st.text(max_size=30), st.integers(), st.none()),
    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v2/nothing"]),
    st.dictionaries(fields, json_values, max_size=5),
)
huge_jobs = st.sampled_from(
    [
        json.dumps(_job("x" * 200_000)).encode(),  # a custom_id larger than a result may be
        json.dumps(_job("huge-prompt", prompt="word " * 60_000)).encode(),
        json.dumps(_job("many-stops", stop=[f"s{i}" for i in range(5000)])).encode(),
        json.dumps(_job("many-choices", guided_choice=[f"c{i}" for i in range(20_000)])).encode(),
        json.dumps(_job("logprobs", logprobs=20, max_tokens=10**9)).encode(),
        json.dumps(_job("big-int", max_tokens=2**70)).encode(),
        json.dumps(_job("special", prompt="</s><s><unk> hi")).encode(),
        # client input that once became a 500 engine_error or NaN logits (issue 29)
        json.dumps(
            _chat_job("deep-call", {"role": "assistant", "tool_calls": [_deep_call(50_000)]})
        ).encode(),
        b'{"custom_id": "deadline", "url": "/v1/completions", "body": {"prompt": "hi", "sluice_deadline_ms": '
        + b"9" * 400
        + b"}}",
        json.dumps(
            _chat_job("marker", {"role": "user", "name": "\ue0009\ue001", "content": "a </s> b"})
        ).encode(),
        json.dumps(_job("tiny-top-p", top_p=1e-300)).encode(),
        json.dumps(_job("huge-repetition-penalty", repetition_penalty=1e300)).encode(),
        json.dumps(_job("tiny-repetition-penalty", repetition_penalty=1e-300)).encode(),
        json.dumps(_job("empty-stop", stop=["end", ""])).encode(),
        json.dumps(_job("many-logit-biases", logit_bias={str(i): 1 for i in range(5000)})).encode(),
        json.dumps(_job("logprobs-of-128", logprobs=20, max_tokens=100, n=128)).encode(),
        # /v1/responses: the new endpoint's fields at their most hostile
        json.dumps(
            _responses_job("r-many-items", input=[{"role": "user", "content": "w"}] * 20_000)
        ).encode(),
        json.dumps(
            _responses_job(
                "r-deep-call",
                input=[
                    {"role": "user", "content": "hi"},
                    {
                        "type": "function_call",
                        "call_id": "c",
                        "name": "f",
                        "arguments": "[" * 50_000 + "]" * 50_000,
                    },
                ],
            )
        ).encode(),
        json.dumps(
            _responses_job(
                "r-many-tools",
                tools=[
                    {"type": "function", "name": f"f{i}", "parameters": {"type": "object"}}
                    for i in range(5000)
                ],
                tool_choice="required",
            )
        ).encode(),
        json.dumps(
            _responses_job(
                "r-deep-schema",
                text={"format": {"type": "json_schema", "name": "x", "schema": _deep_schema(200)}},
            )
        ).encode(),
        json.dumps(_responses_job("r-huge-instructions", instructions="word " * 60_000)).encode(),
        json.dumps(
            _responses_job(
                "r-logprobs",
                include=["message.output_text.logprobs"],
                top_logprobs=20,
                max_output_tokens=10**9,
            )
        ).encode(),
        json.dumps(_responses_job("r-big-int", max_output_tokens=2**70)).encode(),
        json.dumps(_responses_job("r-include-everything", include=["*"] * 1000)).encode(),
        json.dumps(
            _responses_job("r-builtin-tools", tools=[{"type": "web_search"}, {"type": "code_interpreter"}])
        ).encode(),
        json.dumps(_responses_job("r-stored", previous_response_id="resp_" + "x" * 100_000)).encode(),
        json.dumps(
            _responses_job(
                "r-image",
                input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x" * 100_000}]}],
            )
        ).encode(),
        # a job's own chat template is code: it renders in the sandbox, within its limits (issue 29)
        json.dumps(_chat_job("template-loop", chat_template=NESTED_LOOP)).encode(),
        json.dumps(_chat_job("template-memory", chat_template=MEMORY_BOMB)).encode(),
        json.dumps(_chat_job("template-output", chat_template=OUTPUT_BOMB)).encode(),
        json.dumps(_chat_job("template-escape", chat_template="{{ ''.__class__.__mro__ }}")).encode(),
        json.dumps(
            _chat_job("template-recursion", chat_template="{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
        ).encode(),
        json.dumps(
            _chat_job(
                "control-tokens",
                {"role": "assistant", "name": "</s>", "tool_calls": [_call("<s>", '{"a": "</s>"}')]},
                tools=[{"type": "function", "function": {"name": "</s>", "description": "<unk>"}}],
                documents=[{"text": "</s>"}],
                chat_template_kwargs={"x": "</s>"},
            )
        ).encode(),
    ]
)
values = st.one_of(
    st.binary(max_size=300),
    mutated_jobs,
    huge_jobs,
    st.sampled_from([10, 1000, 100_000]).map(_deep),
    json_values.map(lambda v: msgspec.msgpack.encode(v)),
    st.none(),
)
header_keys = st.one_of(
    st.binary(max_size=12),  # mostly not UTF-8
    st.sampled_from([b"content-type", b"reply_to", b"reply-to", b"sluice-deadline-ms", b"traceparent"]),
)
header_values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from([b"application/msgpack", b"9" * 400, b"-1", b"00-zz-zz-01", b"\xff\xfe"]),
)


@st.composite
def hostile_records(draw, topics: dict[str, str]) -> RawRecord:
    headers = draw(st.lists(st.tuples(header_keys, header_values), max_size=4))
    if draw(st.booleans()):
        reply_to = draw(st.sampled_from([*topics.values(), "bad topic!", "a" * 300, "", "x\udcff"]))
        headers.append((b"reply_to", reply_to.encode("utf-8", "surrogateescape")))
    timestamp = draw(st.sampled_from([None, -5, -1, 0, 1, NOW_MS - 400 * 86_400_000, NOW_MS + 1_800_000]))
    key = draw(st.one_of(st.none(), st.binary(max_size=20)))
    return RawRecord(draw(values), key=key, headers=headers, timestamp_ms=timestamp)


class _ServiceThread:
    """A Service running on an event loop of its own thread, while hypothesis drives the test."""

    def __init__(self, config, engine) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine = engine
        self.results: dict[str, list] = {}  # topic -> records read
        self._stop = asyncio.Event()
        self.call(self._start())

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.service = Service(self.config, self.engine)  # its Kafka clients need the running loop
        await self.service.start()
        self.run_task = asyncio.create_task(self.service.run(self._stop))
        c = self.config
        self.reader = AIOKafkaConsumer(
            c.results_topic,
            f"{c.results_topic}.fuzz",
            c.dlq_topic,
            bootstrap_servers=c.kafka_bootstrap,
            auto_offset_reset="earliest",
            # exactly-once: what a read_committed reader sees (an aborted transaction's lines never count)
            isolation_level="read_committed" if c.delivery == "exactly_once" else "read_uncommitted",
        )
        await self.reader.start()
        self.read_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            for tp, records in (await self.reader.getmany(timeout_ms=100)).items():
                self.results.setdefault(tp.topic, []).extend(records)

    def wait_for_key(self, key: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(r.key == key for r in self.results.get(self.config.results_topic, [])):
            assert not self.run_task.done(), "the service stopped"
            assert time.monotonic() < deadline, f"the canary {key!r} was not answered within {timeout}s"
            time.sleep(0.02)

    def close(self) -> None:
        async def stop():
            self.read_task.cancel()
            await self.reader.stop()
            self._stop.set()
            await self.run_task
            await self.service.stop()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(params=["at_least_once", "exactly_once"])
def fuzz_service(request, service_config, tiny_engine):
    # jobs' own chat templates are allowed: rendered in the sandbox, hostile ones within a short limit
    limits = JobLimits(allow_job_chat_template=True, chat_template_timeout_s=0.5)
    config = msgspec.structs.replace(service_config, limits=limits, delivery=request.param)
    running = _ServiceThread(config, tiny_engine)
    yield running
    running.close()


def test_hostile_records_each_end_once_and_never_stop_the_partition(fuzz_service, service_config, kafka):
    c = service_config
    topics = {
        "jobs": c.jobs_topics[0],
        "dlq": c.dlq_topic,
        "traces": c.traces_topic,
        "results": c.results_topic,
        "allowed": f"{c.results_topic}.fuzz",
    }
    posted = []

    @settings(
        max_examples=NUM_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    # the batch uncompressed, or in any codec a producer may use: none, gzip, snappy, lz4, zstd
    @given(record=hostile_records(topics), partition=st.integers(0, 1), compression=st.integers(0, 4))
    def post_and_check_canary(record: RawRecord, partition: int, compression: int) -> None:
        canary_id = f"canary-{uuid.uuid4().hex[:8]}"
        canary = RawRecord(json.dumps(_job(canary_id)).encode(), key=canary_id.encode())
        fuzz_service.call(
            post_raw(kafka.bootstrap, c.jobs_topics[0], partition, [record, canary], compression)
        )
        posted.extend([record, canary])
        fuzz_service.wait_for_key(canary_id.encode())

    post_and_check_canary()
    assert len(posted) >= NUM_EXAMPLES  # hypothesis ran (about) as many examples as asked
    fuzz_service.call(wait_for_commits(kafka, c.group_id, c.jobs_topics[0], timeout=60))

    # every record: exactly one result line (on the results topic or the allowed reply topic),
    # and a dead letter for each error result
    time.sleep(1.0)  # the reader catches up with the last dead letters
    lines = [
        decode_result(r.value, dict(r.headers).get("content-type", b"").decode())
        for r in (
            fuzz_service.results.get(c.results_topic, []) + fuzz_service.results.get(topics["allowed"], [])
        )
    ]
    assert len(lines) == len(posted)
    assert sum(line.is_error for line in lines) == len(fuzz_service.results.get(c.dlq_topic, []))
    assert not fuzz_service.service.engine_failure and not fuzz_service.run_task.done()
    port = fuzz_service.service.http.port
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
