"""Tool calling: tools rendered by the chat template, calls parsed (hermes, llama3_json), and
`tool_choice` "required" or a named function enforced by a JSON schema (tiny engine, JobHandler)."""

from __future__ import annotations

import json
import time

import pytest

from engine import RequestMetrics, RequestOutput
from engine.async_engine import AsyncLLMEngine
from schemas.batch import BatchRequestLine
from schemas.codec import decode_job
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.prompts import chat_inputs, render_chat
from service.tools import parser_for, tool_calls_of
from service.translate import to_result_line

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "parameters": CITY}},
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def _chat_job(**body) -> BatchRequestLine:
    line = {"custom_id": "t", "url": "/v1/chat/completions", "body": {"messages": MESSAGES, **body}}
    return decode_job(json.dumps(line).encode())


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(body: dict):
        job = {"custom_id": "t", "url": "/v1/chat/completions", "body": {"messages": MESSAGES, **body}}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result.response

    yield run
    await engine.stop()


def test_hermes_calls_are_parsed_with_the_text_before_them_as_content() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = tool_calls_of(text, "auto", "hermes")
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("f", {"a": 1}),
        ("g", {}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_llama3_json_calls_are_parsed_after_the_python_tag_and_between_semicolons() -> None:
    text = '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": "x"}}'
    content, calls = tool_calls_of(text, "auto", "llama3_json")
    assert content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("f", {"a": 1}),
        ("g", {"b": "x"}),
    ]


def test_text_that_is_no_call_stays_the_answer_and_parallel_false_keeps_one_call() -> None:
    assert tool_calls_of('{"name": "f", "parameters": ', "auto", "llama3_json") == (
        '{"name": "f", "parameters": ',
        [],
    )
    assert tool_calls_of("<tool_call>not json</tool_call>", "auto", "hermes")[1] == []
    assert tool_calls_of('{"name": "f"}', "none", "llama3_json") == ('{"name": "f"}', [])
    _, calls = tool_calls_of('{"name": "f"}; {"name": "g"}', "auto", "llama3_json", parallel=False)
    assert [c.function.name for c in calls] == ["f"]


def test_the_parser_is_detected_from_the_chat_template_unless_configured() -> None:
    assert parser_for("auto", "{{ '<tool_call>' }}") == "hermes"
    assert parser_for("auto", "{{ messages }}") == "llama3_json"
    assert parser_for("hermes", None) == "hermes"


def test_tools_are_passed_to_the_chat_template(tiny_engine) -> None:
    template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer = tiny_engine.tokenizer
    rendered = render_chat(
        chat_inputs(_chat_job(tools=TOOLS, chat_template=template).body, tokenizer), tokenizer
    )
    assert rendered == "[get_weather][get_time]Weather in Paris?"


def test_an_auto_result_with_calls_has_tool_calls_and_finish_reason_tool_calls() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    output = RequestOutput("r", [1, 2], [5, 6], text, "stop", RequestMetrics(time.time()))
    line = to_result_line(_chat_job(tools=TOOLS), output, "tiny", time.time(), tool_call_parser="hermes")
    choice = line.response.body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"


async def test_a_named_tool_choice_answers_that_functions_arguments(handle) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    response = await handle({"tools": TOOLS, "tool_choice": choice, "max_tokens": 60, "seed": 1})
    (call,) = response.body.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    assert response.body.choices[0].finish_reason == "stop"  # as OpenAI answers a forced call


async def test_tool_choice_required_answers_at_least_one_call_of_a_given_tool(handle) -> None:
    response = await handle(
        {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 80, "seed": 2}
    )
    choice = response.body.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) == {"city"}


@pytest.mark.parametrize(
    "body",
    [
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a+"},
    ],
    ids=["no-tools", "unknown-function", "bad-value", "two-constraints"],
)
async def test_a_tool_choice_that_cannot_be_honoured_is_a_400_naming_it(handle, body) -> None:
    response = await handle(body)
    assert (response.status_code, response.body.error.param) == (400, "tool_choice")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}, "x": 1}},
            "tool_choice.x",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time", "y": 2}}},
            "tool_choice.function.y",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "tool", "function": {"name": "get_time"}}},
            "tool_choice.type",
        ),
    ],
    ids=["parallel-not-a-bool", "unknown-key", "unknown-nested-key", "unknown-type"],
)
async def test_tool_fields_are_typed_to_the_last_key(handle, body, param) -> None:
    """Issue 30, defect 6: these were typed Any and accepted."""
    response = await handle(body)
    assert (response.status_code, response.body.error.param) == (400, param)


# GPT-OSS's harmony format: the analysis message, then a commentary message addressed to a function
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>Need the weather.<|end|>"
HARMONY_CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'


def test_harmony_message_addressed_to_a_function_is_a_call_with_its_body_as_arguments() -> None:
    content, calls = tool_calls_of(HARMONY_CALL + "<|call|>", "auto", "harmony")
    assert content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_harmony_recipient_may_come_before_the_channel_and_calls_may_follow_each_other() -> None:
    second = '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"city": "Rome"}<|call|>'
    content, calls = tool_calls_of(HARMONY_CALL + "<|call|>" + second, "auto", "harmony")
    assert content is None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    _, one = tool_calls_of(HARMONY_CALL + "<|call|>" + second, "auto", "harmony", parallel=False)
    assert [c.function.name for c in one] == ["get_weather"]


def test_harmony_messages_that_are_no_function_call_stay_the_content() -> None:
    final = "<|start|>assistant<|channel|>final<|message|>Sunny."
    content, calls = tool_calls_of(HARMONY_ANALYSIS + HARMONY_CALL + "<|call|>", "auto", "harmony")
    assert content == HARMONY_ANALYSIS and len(calls) == 1  # no reasoning parser took the analysis
    assert tool_calls_of(final, "auto", "harmony") == (final, [])
    browser = '<|start|>assistant<|channel|>analysis to=browser.search<|message|>{"query": "x"}<|call|>'
    assert tool_calls_of(browser, "auto", "harmony") == (browser, [])  # a built-in tool, not a function


def test_harmony_call_cut_short_or_malformed_leaves_the_text_as_the_answer() -> None:
    cut = HARMONY_CALL[:-5]  # max_tokens inside the arguments
    assert tool_calls_of(cut, "auto", "harmony") == (cut, [])


def test_harmony_is_the_tool_parser_of_a_harmony_reasoning_parser() -> None:
    assert parser_for("auto", "{{ '<tool_call>' }}", reasoning_parser="harmony") == "harmony"
    assert parser_for("hermes", None, reasoning_parser="harmony") == "hermes"


def test_a_gpt_oss_result_with_a_harmony_call_has_tool_calls_reasoning_and_finish_reason_tool_calls() -> None:
    output = RequestOutput(
        "t", [1], [2], HARMONY_ANALYSIS + HARMONY_CALL, "stop", RequestMetrics(time.time())
    )
    result = to_result_line(_chat_job(tools=TOOLS), output, "m", time.time(), reasoning_parser="harmony")
    (choice,) = result.response.body.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.reasoning == "Need the weather."
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]


DEEP = "[" * 5000 + "]" * 5000  # deeper than json's recursion bound


@pytest.mark.parametrize(
    ("mode", "parser", "text"),
    [
        ("auto", "hermes", '<tool_call>{"name": "f", "arguments": ' + DEEP + "}</tool_call>"),
        ("auto", "llama3_json", '{"name": "f", "parameters": ' + DEEP + "}"),
        (
            "auto",
            "harmony",
            "<|start|>assistant to=functions.f<|channel|>commentary<|message|>" + DEEP + "<|call|>",
        ),
        ("required", "hermes", '[{"name": "f", "parameters": ' + DEEP + "}]"),
    ],
    ids=["hermes", "llama3_json", "harmony", "required"],
)
def test_a_call_nested_past_jsons_bound_stays_the_answer_text(mode, parser, text) -> None:
    # a model can write 5000 brackets; that is a malformed call, not an engine error
    assert tool_calls_of(text, mode, parser) == (text, [])


STRICT_TOOLS = [TOOLS[0], {"type": "function", "function": {**TOOLS[1]["function"], "strict": True}}]


@pytest.mark.parametrize("tool_choice", [None, "auto", "none"], ids=["default", "auto", "none"])
async def test_strict_tools_are_refused_where_no_grammar_holds_the_arguments(handle, tool_choice) -> None:
    """Issue 30, defect 4: under "auto" (and "none") a call's arguments are whatever the model
    writes, so `strict: true` cannot be kept: it was accepted and ignored; now it is refused."""
    body = {"tools": STRICT_TOOLS} | ({} if tool_choice is None else {"tool_choice": tool_choice})
    response = await handle(body)
    error = response.body.error
    assert (response.status_code, error.code, error.param) == (
        400,
        "unsupported_parameter",
        "tools[1].function.strict",
    )
    assert "required" in error.message


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
async def test_strict_tools_are_honoured_where_the_grammar_holds_the_arguments(handle, tool_choice) -> None:
    response = await handle({"tools": STRICT_TOOLS, "tool_choice": tool_choice, "max_tokens": 80, "seed": 3})
    for call in response.body.choices[0].message.tool_calls:
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
