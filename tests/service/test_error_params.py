"""Every invalid_request error names its field as OpenAI's error `param` does: a user comparing
our answers with OpenAI's or vLLM's sees which field to fix, whichever layer refused it (the
envelope's decoder, the translation to SamplingParams, the engine's vocabulary check).

Each job goes through the JobHandler on the tiny engine, as a job from Kafka does."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler


@pytest.fixture
async def handler(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    yield JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )
    await engine.stop()


@pytest.fixture
def refuse(handler):
    async def run(body: dict, url: str = "/v1/completions", **envelope):
        base = {"prompt": "hello"} if url == "/v1/completions" else {}
        job = {"custom_id": "j", "url": url, "body": {**base, "max_tokens": 4, **body}, **envelope}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        response = outcome.result.response
        assert response is not None and response.status_code == 400, outcome.result
        return response.body.error

    return run


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logit_bias": {"-5": 1}}, "logit_bias"),  # SamplingParams: a negative token id
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # the engine: outside the vocabulary
        ({"logit_bias": {"7": 1000}}, "logit_bias"),  # the schema: a value past 100
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),  # SamplingParams: above max_tokens
        ({"top_p": 0}, "top_p"),  # the schema's bounds
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),  # SamplingParams: float32's inf
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),  # float32's 0
        ({"stop": ""}, "stop"),  # SamplingParams: it would stop at the first token
        ({"stop": ["end", ""]}, "stop"),
        ({"guided_choice": ["a", "b"], "guided_regex": "a+"}, "guided_regex"),  # the second constraint
    ],
    ids=[
        "negative-logit-bias-key",
        "out-of-vocabulary-logit-bias-key",
        "logit-bias-value",
        "min-tokens-above-max",
        "top-p",
        "min-p",
        "repetition-penalty",
        "repetition-penalty-past-float32",
        "repetition-penalty-below-float32",
        "empty-stop",
        "empty-stop-in-a-list",
        "two-constraints",
    ],
)
async def test_a_completion_refused_for_a_value_names_the_field(refuse, body, param):
    error = await refuse(body)
    assert error.code == "invalid_request" and error.param == param
    assert param in error.message


async def test_a_json_schema_format_without_a_schema_names_it(refuse):
    error = await refuse(
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
        url="/v1/chat/completions",
    )
    assert error.param == "response_format.json_schema"


async def test_chat_top_logprobs_out_of_range_names_top_logprobs(refuse):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 10_000}
    error = await refuse(body, url="/v1/chat/completions")
    assert error.param == "top_logprobs"


async def test_a_method_other_than_post_names_method(refuse):
    error = await refuse({}, method="GET")
    assert error.code == "invalid_request" and error.param == "method"


def _chat(*messages: dict) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, *messages]}


async def test_tool_call_arguments_nested_50k_deep_are_a_400_naming_the_call(refuse):
    deep = "[" * 50_000 + "]" * 50_000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    error = await refuse(_chat({"role": "assistant", "tool_calls": [call]}), url="/v1/chat/completions")
    assert error.code == "invalid_request" and error.param == "messages[1].tool_calls[0]"
    assert "nested too deeply" in error.message


async def test_a_deadline_of_400_digits_is_a_400_naming_the_field(refuse):
    error = await refuse({"sluice_deadline_ms": int("9" * 400)})
    assert error.param == "sluice_deadline_ms"


async def test_an_unforeseen_error_in_translation_is_the_jobs_400_not_an_engine_error(refuse, monkeypatch):
    # translation reads only the job: whatever it trips on, the job is the cause
    def trips(*args):
        raise IndexError("list index out of range")

    monkeypatch.setattr("service.jobs.to_engine_request", trips)
    error = await refuse({})
    assert error.code == "invalid_request" and "IndexError" in error.message


async def test_an_infinite_repetition_penalty_in_messagepack_is_a_400_naming_it(handler):
    # JSON cannot spell inf; MessagePack can
    body = {"prompt": "hello", "max_tokens": 4, "repetition_penalty": float("inf")}
    value = msgspec.msgpack.encode({"custom_id": "j", "url": "/v1/completions", "body": body})
    headers = [("content-type", b"application/msgpack")]
    outcome = await handler.handle(value, headers, int(time.time() * 1000), "jobs/0/1")
    assert outcome.result.response.status_code == 400
    assert outcome.result.response.body.error.param == "repetition_penalty"


async def test_a_top_p_below_float32s_range_samples_text_not_unk(handler):
    greedy = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
    tiny_top_p = {"prompt": "hello", "max_tokens": 4, "top_p": 1e-300, "seed": 1}
    texts = []
    for body in (greedy, tiny_top_p):
        job = json.dumps({"custom_id": "j", "url": "/v1/completions", "body": body}).encode()
        outcome = await handler.handle(job, [], int(time.time() * 1000), "jobs/0/1")
        texts.append(outcome.result.response.body.choices[0].text)
    assert texts[1] == texts[0]  # only the top token is ever kept: greedy's text
