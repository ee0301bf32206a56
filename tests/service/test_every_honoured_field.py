"""Every field the policy honours (or accepts without effect) runs through the JobHandler on the
tiny engine: a job that sets it to a value other than its default gets a 200, on each endpoint
the field is for. The table below must name every such rule (a test checks), so a field added to
the policy without a job that uses it fails here.

What each field does is proven beside: test_honoured_fields.py, test_sampling_fields.py,
test_parallel_samples.py, test_structured_jobs.py, test_tools.py, test_embeddings.py,
test_reasoning.py, test_jobs_deadline.py, and (through Kafka and `sluice batch --local`)
test_conformance.py. Refused fields: test_field_policy.py. Each job's body is also validated
strictly against OpenAI's own client types.
"""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.fields import FIELD_RULES
from service.jobs import JobHandler
from service.limits import JobLimits
from tests.service.openai_types import check_body

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
PREFILL = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Yes,"}]

# field -> what a job sets to use it (a value other than the default; with what it needs beside it)
BOTH = {
    "model": {"model": "tiny"},
    "max_tokens": {"max_tokens": 2},
    "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.5},
    "n": {"n": 2},
    "stop": {"stop": ["\n", "."]},
    "seed": {"seed": 3},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "logit_bias": {"logit_bias": {"5": 1.0}},
    "response_format": {"response_format": {"type": "json_object"}},
    "echo": {"echo": True},
    "user": {"user": "u-1"},
    "metadata": {"metadata": {"k": "v"}},
    "store": {"store": True},
    "service_tier": {"service_tier": "flex"},
    "safety_identifier": {"safety_identifier": "s-1"},
    "prompt_cache_key": {"prompt_cache_key": "k"},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "best_of": {"best_of": 2},
    "structured_outputs": {"structured_outputs": {"regex": "[ab]+"}},
    "guided_choice": {"guided_choice": ["a", "b"]},
    "guided_regex": {"guided_regex": "[ab]+"},
    "guided_json": {"guided_json": {"type": "object"}},
    "top_k": {"top_k": 5},
    "min_p": {"min_p": 0.1},
    "repetition_penalty": {"repetition_penalty": 1.2},
    "ignore_eos": {"ignore_eos": True},
    "min_tokens": {"min_tokens": 2},
    "skip_special_tokens": {"skip_special_tokens": False},
    "include_stop_str_in_output": {"include_stop_str_in_output": True, "stop": ["."]},
    "truncate_prompt_tokens": {"truncate_prompt_tokens": 2},
    "add_special_tokens": {"add_special_tokens": True},
    "priority": {"priority": -5},
    "stop_token_ids": {"stop_token_ids": [5]},
    "request_id": {"request_id": "mine"},
    "sluice_deadline_ms": {"sluice_deadline_ms": FAR_FUTURE_MS},
}
CHAT_ONLY = {
    "messages": {
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief"}],
            },
            {"role": "user", "content": "Hi", "name": "ann"},
        ]
    },
    "max_completion_tokens": {"max_completion_tokens": 2},
    "logprobs": {"logprobs": True},
    "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "return_tokens_as_token_ids": {"logprobs": True, "return_tokens_as_token_ids": True},
    "tools": {"tools": TOOLS},
    "tool_choice": {"tools": TOOLS, "tool_choice": "none"},
    "parallel_tool_calls": {"tools": TOOLS, "parallel_tool_calls": False},
    "add_generation_prompt": {"add_generation_prompt": False},
    "continue_final_message": {
        "messages": PREFILL,
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    "chat_template": {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
    "chat_template_kwargs": {"chat_template_kwargs": {"enable_thinking": False}},
    "documents": {"documents": [{"title": "river", "text": "cold"}]},
    "include_reasoning": {"include_reasoning": False},
}
COMPLETIONS_ONLY = {
    "prompt": {"prompt": [5, 6, 7]},
    "logprobs": {"logprobs": 2},
    "return_tokens_as_token_ids": {"logprobs": 1, "return_tokens_as_token_ids": True},
    "add_special_tokens": {"add_special_tokens": False},
}
EMBEDDING_FIELDS = {
    "input": {"input": [[5, 6, 7], [8, 9]]},
    "model": {"model": "tiny"},
    "encoding_format": {"encoding_format": "base64"},
    "dimensions": {"dimensions": 4},
    "user": {"user": "u-1"},
    "truncate_prompt_tokens": {"truncate_prompt_tokens": 2},
    "add_special_tokens": {"add_special_tokens": False},
    "priority": {"priority": 3},
    "request_id": {"request_id": "mine"},
    "sluice_deadline_ms": {"sluice_deadline_ms": FAR_FUTURE_MS},
}
RESPONSE_TOOLS = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
RESPONSE_FIELDS = {
    "input": {
        "input": [
            {"role": "system", "content": [{"type": "input_text", "text": "Be brief"}]},
            {"role": "user", "content": "Hi"},
        ]
    },
    "model": {"model": "tiny"},
    "instructions": {"instructions": "Be brief."},
    "max_output_tokens": {"max_output_tokens": 2},
    "temperature": {"temperature": 0.5},
    "top_p": {"top_p": 0.5},
    "top_logprobs": {"include": ["message.output_text.logprobs"], "top_logprobs": 2},
    "include": {"include": ["message.output_text.logprobs"]},
    "text": {"text": {"format": {"type": "json_object"}}},
    "tools": {"tools": RESPONSE_TOOLS},
    "tool_choice": {"tools": RESPONSE_TOOLS, "tool_choice": "none"},
    "parallel_tool_calls": {"tools": RESPONSE_TOOLS, "parallel_tool_calls": False},
    # an effort needs a template that reads one (test_responses_api.py); the tiny model's does not
    "reasoning": {"reasoning": {"effort": None}},
    "seed": {"seed": 3},
    "priority": {"priority": -5},
    "sluice_deadline_ms": {"sluice_deadline_ms": FAR_FUTURE_MS},
    "metadata": {"metadata": {"k": "v"}},
    "user": {"user": "u-1"},
    "safety_identifier": {"safety_identifier": "s-1"},
    "prompt_cache_key": {"prompt_cache_key": "k"},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "service_tier": {"service_tier": "flex"},
}
BASES = {
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "seed": 1},
    COMPLETIONS: {"prompt": "The river is", "max_tokens": 3, "seed": 1},
    EMBEDDINGS: {"input": "the river"},
    RESPONSES: {"input": "Hi", "max_output_tokens": 3, "seed": 1},
}


def _uses(url: str) -> dict[str, dict]:
    if url == EMBEDDINGS:
        return EMBEDDING_FIELDS
    if url == RESPONSES:
        return RESPONSE_FIELDS
    return {**BOTH, **(CHAT_ONLY if url == CHAT else COMPLETIONS_ONLY)}


def _accepted(url: str) -> set[str]:
    endpoint = {
        CHAT: ("both", "chat"),
        COMPLETIONS: ("both", "completions"),
        EMBEDDINGS: ("embeddings",),
        RESPONSES: ("responses",),
    }
    return {r.name for r in FIELD_RULES if r.status != "refused" and r.endpoint in endpoint[url]}


def _cases() -> list[tuple[str, str]]:
    urls = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
    return [(url, field) for url in urls for field in sorted(_accepted(url))]


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(
            model_name="tiny", default_max_tokens=8, limits=JobLimits(allow_job_chat_template=True)
        ),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(url: str, body: dict):
        job = {"custom_id": "j", "url": url, "body": {**BASES[url], **body}}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result

    yield run
    await handler.stop()
    await engine.stop()


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES])
def test_the_table_names_a_job_for_every_field_the_policy_honours(url) -> None:
    assert set(_uses(url)) == _accepted(url)


@pytest.mark.parametrize(("url", "field"), _cases())
async def test_a_job_setting_an_honoured_field_runs(handle, url, field) -> None:
    """... and its body is one OpenAI's client library reads, strictly (tests/service/openai_types.py)."""
    result = await handle(url, _uses(url)[field])
    assert result.error is None
    assert result.response.status_code == 200, result.response.body
    check_body(url, msgspec.to_builtins(result.response.body))
