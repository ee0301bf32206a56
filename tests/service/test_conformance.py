"""Conformance: an OpenAI-format batch file through `sluice batch --local`, through `sluice batch`
and Kafka, and its jobs as records straight on the jobs topic; every output line validates against
OpenAI's batch output schema (tests/service/openai_batch_schema.py), every body strictly against
OpenAI's own client types (tests/service/openai_types.py), and chat and completion bodies carry
vLLM's extras. Each path writes the same bodies as a JobHandler in the test's own process, ids,
timestamps and timings aside: the three paths write the same bodies for the same lines.

The file holds chat and completion jobs (plain, logprobs, stop strings, echo, a greedy choice,
logit_bias, n and best_of), embeddings (floats, and base64 with dimensions), a required tool call,
a tool-call history with `tool_choice: auto`, Responses jobs (instructions, logprobs, a JSON
schema, a required function tool), refused ones (a refused field, an unknown field, another
model, a Responses job that needs stored state, a built-in tool) and a line that is no JSON.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time

import jsonschema
import msgspec
import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.limits import JobLimits
from tests.service.client.label_helpers import run_sluice, sluice_env
from tests.service.openai_batch_schema import BATCH_OUTPUT_LINE, body_schema
from tests.service.openai_types import check_body

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the river cold?"}]


TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}</tool_call>{% endfor %}"
    "{% endfor %}<|assistant|>"
)
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"ok": true}'}}


def _job(custom_id: str, url: str, body: dict) -> dict:
    base = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {**base, **body}}


def _responses_job(custom_id: str, body: dict) -> dict:
    base = {"model": "tiny", "max_output_tokens": 5, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": {**base, **body}}


# custom_id -> (job, the status its result must have)
JOBS = {
    "chat": (_job("chat", CHAT, {"messages": MESSAGES}), 200),
    "chat-logprobs": (
        _job("chat-logprobs", CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}),
        200,
    ),
    "chat-choice": (_job("chat-choice", CHAT, {"messages": MESSAGES, "guided_choice": ["yes", "no"]}), 200),
    "chat-prefill": (
        _job(
            "chat-prefill",
            CHAT,
            {
                "messages": [*MESSAGES, {"role": "assistant", "content": "Yes,"}],
                "add_generation_prompt": False,
                "continue_final_message": True,
                "echo": True,
            },
        ),
        200,
    ),
    "completion": (_job("completion", COMPLETIONS, {"prompt": "The river is"}), 200),
    "completion-logprobs": (
        _job("completion-logprobs", COMPLETIONS, {"prompt": [5, 6, 7], "logprobs": 2, "max_tokens": 3}),
        200,
    ),
    "completion-stop": (
        _job(
            "completion-stop",
            COMPLETIONS,
            {"prompt": "Once upon", "stop": [" "], "include_stop_str_in_output": True, "min_tokens": 1},
        ),
        200,
    ),
    "completion-echo": (_job("completion-echo", COMPLETIONS, {"prompt": "Hello", "echo": True}), 200),
    "completion-bias": (
        _job("completion-bias", COMPLETIONS, {"prompt": "Hello", "logit_bias": {"9": 50}}),
        200,
    ),
    "chat-n": (_job("chat-n", CHAT, {"messages": MESSAGES, "n": 2, "temperature": 1, "seed": 4}), 200),
    "completion-best-of": (
        _job(
            "completion-best-of",
            COMPLETIONS,
            {"prompt": "The river is", "n": 2, "best_of": 3, "temperature": 1, "seed": 5, "logprobs": 1},
        ),
        200,
    ),
    "greedy-n": (_job("greedy-n", COMPLETIONS, {"prompt": "x", "n": 2}), 400),
    "refused-field": (_job("refused-field", CHAT, {"messages": MESSAGES, "use_beam_search": True}), 400),
    "unknown-field": (_job("unknown-field", COMPLETIONS, {"prompt": "x", "frobnicate": True}), 400),
    "tools": (
        _job(
            "tools",
            CHAT,
            {
                "messages": MESSAGES,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": TOOL_PARAMETERS}}],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "temperature": 1,
                "seed": 3,
                "max_tokens": 60,
            },
        ),
        200,
    ),
    "tools-history": (
        _job(
            "tools-history",
            CHAT,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Is it"}, {"type": "text", "text": "ok?"}],
                    },
                    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                    {"role": "tool", "content": '{"ok": true}', "tool_call_id": "call_1"},
                ],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": TOOL_PARAMETERS}}],
                "tool_choice": "auto",
                "chat_template": TOOL_TEMPLATE,  # the tiny model's own template has no tool role
            },
        ),
        200,
    ),
    "other-model": (_job("other-model", COMPLETIONS, {"prompt": "x", "model": "gpt-4o-mini"}), 404),
    "responses": (
        _responses_job(
            "responses",
            {
                "instructions": "Be brief.",
                "input": "Is the river cold?",
                "metadata": {"run": "7"},
                "user": "u1",
            },
        ),
        200,
    ),
    "responses-logprobs": (
        _responses_job(
            "responses-logprobs",
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "Is the river cold?"}]}
                ],
                "include": ["message.output_text.logprobs"],
                "top_logprobs": 2,
            },
        ),
        200,
    ),
    "responses-json": (
        _responses_job(
            "responses-json",
            {
                "input": "Is it ok?",
                "text": {
                    "format": {"type": "json_schema", "name": "v", "schema": TOOL_PARAMETERS, "strict": True}
                },
                "max_output_tokens": 40,
            },
        ),
        200,
    ),
    "responses-tools": (
        _responses_job(
            "responses-tools",
            {
                "input": "Is it ok?",
                "tools": [{"type": "function", "name": "f", "parameters": TOOL_PARAMETERS, "strict": True}],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "temperature": 1,
                "seed": 3,
                "max_output_tokens": 60,
            },
        ),
        200,
    ),
    "responses-stored": (
        _responses_job("responses-stored", {"input": "x", "previous_response_id": "resp_1"}),
        400,
    ),
    "responses-web-search": (
        _responses_job("responses-web-search", {"input": "x", "tools": [{"type": "web_search"}]}),
        400,
    ),
    "embeddings": (
        {
            "custom_id": "embeddings",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": ["x", "yz"]},
        },
        200,
    ),
    "embeddings-base64": (
        {
            "custom_id": "embeddings-base64",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "tiny", "input": [[5, 6, 7]], "dimensions": 8, "encoding_format": "base64"},
        },
        200,
    ),
}


@pytest.fixture
def service_config(service_config):
    """The tools-history job brings its own chat template: the operator allows that here."""
    return msgspec.structs.replace(service_config, limits=JobLimits(allow_job_chat_template=True))


def _env(config) -> dict[str, str]:
    return {**sluice_env(config), "SLUICE_ALLOW_JOB_CHAT_TEMPLATE": "true"}


def _check_lines(lines: list[dict], jobs: dict) -> None:
    """Every line validates against OpenAI's schema (its body by url and status) and has the expected status."""
    for line in lines:
        jsonschema.validate(line, BATCH_OUTPUT_LINE)
        job, status = jobs[line["custom_id"]]
        response = line["response"]
        assert response is not None and response["status_code"] == status, line
        jsonschema.validate(response["body"], body_schema(job["url"], status))
        if status == 200:
            check_body(job["url"], response["body"])
        if status == 200 and job["url"] in (CHAT, COMPLETIONS):
            _check_vllm_extras(response["body"])
    assert {line["custom_id"] for line in lines} == set(jobs)


def _check_vllm_extras(body: dict) -> None:
    """vLLM's extras of a completion: each choice's `stop_reason`, the prompt's `cached_tokens`."""
    assert all("stop_reason" in choice for choice in body["choices"]), body
    assert isinstance(body["usage"]["prompt_tokens_details"]["cached_tokens"], int), body


def _batch_file(tmp_path, jobs: dict) -> str:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job, _ in jobs.values()) + "{not json\n")
    return str(path)


def _check_batch_output(out) -> None:
    """`sluice batch`'s output file: a line per job (and one for the line that is no JSON), each
    conforming, with the answers the jobs asked for."""
    lines = [json.loads(raw) for raw in out.read_text().splitlines()]
    bad_id = f"line-{len(JOBS)}"
    (bad,) = [line for line in lines if line["custom_id"] == bad_id]  # the line that is no JSON
    # what the service writes for the same bytes on the jobs topic (below): no request, no response
    assert bad["response"] is None and bad["error"]["code"] == "invalid_encoding", bad
    jsonschema.validate(bad, BATCH_OUTPUT_LINE)
    _check_lines([line for line in lines if line["custom_id"] != bad_id], JOBS)
    by_id = {line["custom_id"]: line["response"]["body"] for line in lines if line["custom_id"] != bad_id}
    probabilities = by_id["chat-choice"]["sluice"]["choice_probabilities"]
    assert by_id["chat-choice"]["choices"][0]["message"]["content"] == max(
        probabilities, key=probabilities.get
    )
    assert by_id["chat-prefill"]["choices"][0]["message"]["content"].startswith("Yes,")
    tools = by_id["tools"]["choices"][0]
    assert (
        tools["finish_reason"] == "tool_calls"
        and tools["message"]["tool_calls"][0]["function"]["name"] == "f"
    )
    assert [d["index"] for d in by_id["embeddings"]["data"]] == [0, 1]
    for custom_id in ("chat-n", "completion-best-of"):
        assert [c["index"] for c in by_id[custom_id]["choices"]] == [0, 1]
    _check_responses(by_id)


def _check_responses(by_id: dict) -> None:
    """The Responses lines answered as asked: settings echoed, logprobs, the schema, the call."""
    plain = by_id["responses"]
    assert (plain["instructions"], plain["metadata"], plain["user"]) == ("Be brief.", {"run": "7"}, "u1")
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = by_id["responses-logprobs"]["output"]
    assert [len(lp["top_logprobs"]) for lp in message["content"][0]["logprobs"]] == [2] * 5
    (message,) = by_id["responses-json"]["output"]
    jsonschema.validate(json.loads(message["content"][0]["text"]), TOOL_PARAMETERS)
    (call,) = by_id["responses-tools"]["output"]
    assert call["type"] == "function_call" and call["name"] == "f"
    jsonschema.validate(json.loads(call["arguments"]), TOOL_PARAMETERS)


# what differs between two runs of the same line: generated ids, timestamps, timings; what the
# prefix cache held (the in-process run warms the engine the Kafka paths' service then uses); and
# the fingerprint, which names the engine's configuration (the --local run's engine has the
# checkpoint's max_model_len, the in-process one 256)
_GENERATED_ID = re.compile(r"^(chatcmpl-|cmpl-|resp_|msg_|fc_|rs_|call_)[0-9a-zA-Z]+$")
_NOT_COMPARED = (
    "id",
    "created",
    "created_at",
    "sluice",
    "system_fingerprint",
    "cached_tokens",
    "cache_write_tokens",
)


def _comparable(value):
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in _NOT_COMPARED}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, str) and _GENERATED_ID.match(value):
        return _GENERATED_ID.match(value)[1]
    return value


async def _reference_bodies(tiny_engine) -> dict[str, dict]:
    """Each job's body as a JobHandler in this process writes it (the service's and --local's handler)."""
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(
            model_name="tiny", default_max_tokens=8, limits=JobLimits(allow_job_chat_template=True)
        ),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )
    try:
        bodies = {}
        for custom_id, (job, _) in JOBS.items():
            outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "ref/0/0")
            bodies[custom_id] = _comparable(msgspec.to_builtins(outcome.result.response.body))
    finally:
        await engine.stop()
    return bodies


def _check_same_bodies(lines: list[dict], reference: dict[str, dict]) -> None:
    for line in lines:
        if line["custom_id"] in reference:
            _assert_same(
                _comparable(line["response"]["body"]), reference[line["custom_id"]], line["custom_id"]
            )


def _assert_same(ours, theirs, path: str) -> None:
    """Equal, numbers to within float32 arithmetic of another batch's composition (a base64
    embedding as its floats)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), path
        for key in ours:
            _assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ours, float) or isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=1e-4), path
    elif path.endswith(".embedding") and isinstance(ours, str):
        _assert_same(_floats(ours), _floats(theirs), path)
    else:
        assert ours == theirs, path


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.mark.slow
async def test_a_batch_file_through_sluice_batch_local_conforms_to_openais_output_schema(
    service_config, tiny_engine, tmp_path
) -> None:
    reference = await _reference_bodies(tiny_engine)
    out = tmp_path / "out.jsonl"
    args = ("batch", _batch_file(tmp_path, JOBS), str(out), "--local", "--no-progress")
    done = await run_sluice(*args, env=_env(service_config))
    assert done.returncode == 0, done.stderr
    _check_batch_output(out)
    _check_same_bodies([json.loads(raw) for raw in out.read_text().splitlines()], reference)


@pytest.mark.slow
@pytest.mark.kafka
async def test_a_batch_file_through_sluice_batch_and_kafka_conforms_to_openais_output_schema(
    service_config, run_service, tiny_engine, tmp_path
) -> None:
    reference = await _reference_bodies(tiny_engine)
    out = tmp_path / "out.jsonl"
    async with run_service(service_config):
        args = ("batch", _batch_file(tmp_path, JOBS), str(out), "--no-progress")
        done = await run_sluice(*args, env=_env(service_config))
    assert done.returncode == 0, done.stderr
    _check_batch_output(out)
    _check_same_bodies([json.loads(raw) for raw in out.read_text().splitlines()], reference)


@pytest.mark.kafka
async def test_jobs_through_kafka_conform_to_openais_output_schema(
    kafka, service_config, run_service, tiny_engine
) -> None:
    reference = await _reference_bodies(tiny_engine)
    topic = service_config.jobs_topics[0]
    await kafka.post(topic, [(cid.encode(), json.dumps(job).encode(), []) for cid, (job, _) in JOBS.items()])
    await kafka.post(topic, [(b"garbage", b"{not json", [])])
    async with run_service(service_config):
        records = await kafka.read(service_config.results_topic, len(JOBS) + 1)
    lines = [json.loads(record.value) for record in records]
    garbage = [line for line in lines if line["custom_id"] not in JOBS]
    assert len(garbage) == 1 and garbage[0]["response"] is None  # no request, no response
    assert garbage[0]["error"]["code"] == "invalid_encoding"
    jsonschema.validate(garbage[0], BATCH_OUTPUT_LINE)
    _check_lines([line for line in lines if line["custom_id"] in JOBS], JOBS)
    _check_same_bodies([line for line in lines if line["custom_id"] in JOBS], reference)
