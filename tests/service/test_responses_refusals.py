"""`/v1/responses` jobs refused by name: the parts of honoured fields we do not implement, unknown
fields, invalid requests, and what the chat path refuses, each named by the Responses field the
job wrote (a limit, an unknown function, a schema, a prompt too long). (Refused fields across
every endpoint: test_field_policy.py.)"""

from __future__ import annotations

import pytest

from service.config import ServiceConfig
from service.limits import JobLimits
from tests.service.responses_jobs import TOOL, running


@pytest.fixture
async def handle(tiny_engine):
    async with running(tiny_engine) as run:
        yield run


# --- refusals by name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[1]"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0]"),
        ({"tools": [{**TOOL, "strict": True}]}, "tools[0].strict"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0]"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ],
    ids=[
        "web_search",
        "file_search",
        "code_interpreter",
        "strict-under-auto",
        "hosted-tool-choice",
        "allowed-tools",
        "image-input",
        "file-input",
        "reasoning-item",
        "item-reference",
        "encrypted-reasoning",
        "search-results",
        "reasoning-summary",
        "verbosity",
    ],
)
async def test_refused_parts_of_honoured_fields_are_named_by_their_path(handle, body, param) -> None:
    response = await handle({"input": "Hi", **body})
    error = response["body"]["error"]
    assert (response["status_code"], error["code"], error["param"]) == (400, "unsupported_parameter", param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "Hi", "frobnicate": 1}, "frobnicate"),
        ({"input": [{"role": "user", "content": "Hi", "mood": "calm"}]}, "input[0].mood"),
        ({"input": "Hi", "tools": [{**TOOL, "colour": "red"}]}, "tools[0].colour"),
    ],
)
async def test_an_unknown_field_is_refused_by_name(handle, body, param) -> None:
    response = await handle(body)
    assert (response["status_code"], response["body"]["error"]["param"]) == (400, param)
    assert response["body"]["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"content": "Hi"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "Hi", "tool_choice": {"type": "function"}}, "tool_choice.name"),
        ({"input": []}, "input"),
        ({"input": "Hi", "temperature": 3}, "temperature"),
        ({"input": "Hi", "model": "gpt-5"}, "model"),
    ],
    ids=[
        "no-role",
        "call-without-id",
        "output-without-id",
        "schema-missing",
        "function-without-name",
        "empty-input",
        "temperature",
        "model",
    ],
)
async def test_an_invalid_request_is_a_4xx_naming_the_field(handle, body, param) -> None:
    response = await handle(body)
    assert response["status_code"] in (400, 404) and response["body"]["error"]["param"] == param


# --- errors from the chat path, named as the Responses job named its fields ------------------------


async def test_a_limit_names_the_responses_field_that_passed_it(tiny_engine) -> None:
    config = ServiceConfig(model_name="tiny", default_max_tokens=8, limits=JobLimits(max_logprob_tokens=10))
    body = {
        "input": "Hi",
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 5,
        "max_output_tokens": 8,
    }
    async with running(tiny_engine, config) as run:
        response = await run(body)
    error = response["body"]["error"]
    assert (error["code"], error["param"]) == ("limit_exceeded", "top_logprobs")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {
                        "type": "function_call",
                        "call_id": "c",
                        "name": "f",
                        "arguments": "[" * 5000 + "]" * 5000,
                    },
                ]
            },
            "invalid_request",
            "input",
        ),
        (
            {"input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}},
            "invalid_request",
            "tool_choice",
        ),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
            "invalid_structured_output",
            None,
        ),
        ({"input": "word " * 2000}, "invalid_prompt", None),
    ],
    ids=["deep-arguments", "unknown-function", "bad-schema", "too-long"],
)
async def test_what_the_chat_path_refuses_is_named_by_the_responses_field(handle, body, code, param) -> None:
    response = await handle(body)
    error = response["body"]["error"]
    assert (response["status_code"], error["code"], error["param"]) == (400, code, param)
