"""The field policy: every request field honoured or refused by name, through the JobHandler on the tiny engine.

Each refused field, set to a value other than its default, gets a 400 `unsupported_parameter`
error result whose `param` names it; unknown fields are refused unless `unknown_fields` is
"ignore"; `model` must be the served name or an alias. The table in docs/wire-format.md is the
table in service/fields.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import msgspec
import pytest

from engine.async_engine import AsyncLLMEngine
from schemas.embeddings import EmbeddingRequest
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses_api import ResponsesRequest
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.fields import FIELD_RULES, rules_for
from service.jobs import JobHandler

DOCS = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
BODY_TYPES = {
    CHAT: ChatCompletionRequest,
    COMPLETIONS: CompletionRequest,
    EMBEDDINGS: EmbeddingRequest,
    RESPONSES: ResponsesRequest,
}
MESSAGES = [{"role": "user", "content": "Hello"}]

# a value other than the default for each refused field (or refused value of a field)
REFUSED_VALUES = {
    "stream": True,
    "stream_options": {"include_usage": True},
    "use_beam_search": True,
    "length_penalty": 0.5,
    "guided_grammar": "root ::= 'a'",
    "structural_tag": "{}",
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " *",
    "spaces_between_special_tokens": False,
    "prompt_logprobs": 1,
    "allowed_token_ids": [5, 6],
    "bad_words": ["river"],
    "logits_processors": ["my.Processor"],
    "return_token_ids": True,
    "cache_salt": "salt",
    "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1},
    "max_repetition_pattern_size": 4,
    "min_repetition_pattern_size": 2,
    "repetition_min_count": 3,
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "include_reasoning": "no",  # a boolean or nothing
    "mm_processor_kwargs": {"a": 1},
    "suffix": "tail",
    "prompt_embeds": "AAAA",
    "normalize": False,
    "embed_dtype": "float16",
    "endianness": "big",
    # /v1/responses: what needs state or services Sluice does not have
    "store": True,
    "previous_response_id": "resp_123",
    "conversation": "conv_123",
    "background": True,
    "background_options": {"ttl": 60},
    "prompt": {"id": "pmpt_123", "version": "2"},
    "truncation": "auto",
    "max_tool_calls": 3,
    "context_management": [{"type": "compaction"}],
    "moderation": {"mode": "strict"},
    "image": {"size": "auto"},
    "access_programs": ["p"],
    "prompt_cache_options": {"mode": "x"},
}


def _job(url: str, body: dict, custom_id: str = "job-1") -> bytes:
    base = {
        CHAT: {"messages": MESSAGES, "max_tokens": 3},
        COMPLETIONS: {"prompt": "Hello", "max_tokens": 3},
        EMBEDDINGS: {"input": "Hello"},
        RESPONSES: {"input": "Hello", "max_output_tokens": 3},
    }[url]
    return json.dumps({"custom_id": custom_id, "url": url, "body": {**base, **body}}).encode()


def _handler(async_engine: AsyncLLMEngine, **options) -> JobHandler:
    """A handler of a service configured with `options`, on the engine `async_engine` runs."""
    batcher = DynamicBatcher(async_engine, max_batch_size=8, max_wait_ms=1)
    config = ServiceConfig(model_name="tiny", default_max_tokens=8, **options)
    return JobHandler(config, batcher, async_engine.engine)


@pytest.fixture
async def async_engine(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
def handle(async_engine):
    handler = _handler(async_engine, model_aliases=["tiny-alias"])

    async def run(url: str, body: dict):
        outcome = await handler.handle(_job(url, body), [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result

    return run


def _refused(url: str) -> list[tuple[str, str]]:
    return [(url, r.name) for r in rules_for(BODY_TYPES[url]) if r.status == "refused" or r.accepts]


@pytest.mark.parametrize(("url", "field"), [case for url in BODY_TYPES for case in _refused(url)])
async def test_each_refused_field_is_a_400_unsupported_parameter_naming_it(handle, url, field) -> None:
    result = await handle(url, {field: REFUSED_VALUES[field]})
    assert result.response.status_code == 400
    error = result.response.body.error
    assert (error.code, error.param) == ("unsupported_parameter", field)
    assert field in error.message
    assert result.error is None


def test_every_refused_rule_has_a_test_value_and_every_declared_field_a_rule() -> None:
    refused = {r.name for r in FIELD_RULES if r.status == "refused"}
    assert refused <= set(REFUSED_VALUES), refused - set(REFUSED_VALUES)
    for body_type in BODY_TYPES.values():
        declared = set(body_type.__struct_fields__)
        assert declared == {r.name for r in rules_for(body_type)}, body_type


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs.grammar"),
        (
            {"structured_outputs": {"choice": ["a"], "whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        (
            {"response_format": {"type": "structural_tag", "structures": [], "triggers": []}},
            "response_format",
        ),
        ({"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages[0].refusal"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0]",
        ),
    ],
    ids=["grammar", "whitespace", "structural_tag", "refusal", "audio-part"],
)
async def test_refused_parts_of_honoured_fields_are_named_by_their_path(handle, body, param) -> None:
    result = await handle(CHAT, body)
    assert (result.response.status_code, result.response.body.error.param) == (400, param)
    assert result.response.body.error.code == "unsupported_parameter"


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS, RESPONSES])
async def test_an_unknown_field_is_refused_by_name_by_default(handle, url) -> None:
    result = await handle(url, {"frobnicate": 1})
    assert result.response.status_code == 400
    error = result.response.body.error
    assert (error.code, error.param) == ("unsupported_parameter", "frobnicate")


async def test_an_unknown_nested_field_is_refused_with_its_path(handle) -> None:
    result = await handle(CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "calm"}]})
    assert result.response.body.error.param == "messages[0].mood"


async def test_unknown_fields_ignore_runs_the_job_as_vllm_would(async_engine) -> None:
    handler = _handler(async_engine, unknown_fields="ignore")
    outcome = await handler.handle(_job(CHAT, {"frobnicate": 1}), [], int(time.time() * 1000), "jobs/0/2")
    assert outcome.result.response.status_code == 200


async def test_a_known_but_refused_field_is_refused_even_when_unknown_fields_are_ignored(
    async_engine,
) -> None:
    handler = _handler(async_engine, unknown_fields="ignore")
    outcome = await handler.handle(
        _job(COMPLETIONS, {"suffix": "x"}), [], int(time.time() * 1000), "jobs/0/3"
    )
    assert outcome.result.response.body.error.param == "suffix"


@pytest.mark.parametrize("model", ["", "tiny", "tiny-alias"])
async def test_the_served_name_an_alias_or_no_model_runs(handle, model) -> None:
    result = await handle(COMPLETIONS, {"model": model})
    assert result.response.status_code == 200
    assert result.response.body.model == "tiny"


async def test_another_model_is_a_404_model_not_found(handle) -> None:
    result = await handle(COMPLETIONS, {"model": "gpt-4o"})
    assert result.response.status_code == 404
    error = result.response.body.error
    assert (error.code, error.param, error.type) == ("model_not_found", "model", "invalid_request_error")


@pytest.mark.parametrize("url", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES])
@pytest.mark.parametrize("priority", [-1001, 1001, 2**70])
async def test_a_priority_outside_the_engines_levels_is_a_400_naming_it(handle, url, priority) -> None:
    result = await handle(url, {"priority": priority})
    assert (result.response.status_code, result.response.body.error.param) == (400, "priority")


@pytest.mark.parametrize("field", ["n", "best_of"])
async def test_more_than_128_samples_is_a_400_naming_the_field(handle, field) -> None:
    result = await handle(COMPLETIONS, {field: 10**6, "temperature": 1})  # before: no answer within a minute
    assert (result.response.status_code, result.response.body.error.param) == (400, field)


async def test_top_logprobs_without_logprobs_is_refused_not_ignored(handle) -> None:
    result = await handle(CHAT, {"top_logprobs": 3})
    assert (result.response.status_code, result.response.body.error.param) == (400, "top_logprobs")


async def test_fields_with_no_effect_are_accepted(handle) -> None:
    body = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "request_id": "r",
        "parallel_tool_calls": True,
    }
    assert (await handle(CHAT, body)).response.status_code == 200


def test_the_wire_format_page_carries_the_field_table_row_for_row() -> None:
    rows = re.findall(
        r"^\| `[a-z_]+` \| (?:chat|completions|both|embeddings|responses) \| .*$", DOCS.read_text(), re.M
    )
    assert rows == [rule.markdown for rule in FIELD_RULES]


def test_a_refusal_round_trips_through_the_result_codec() -> None:
    from schemas.codec import decode_result, encode_result
    from service.translate import to_error_line

    line = to_error_line("c", "unsupported_parameter", "`n` = 2 is not supported", param="n")
    assert msgspec.json.decode(encode_result(line))["response"]["body"]["error"]["param"] == "n"
    assert decode_result(encode_result(line)) == line
