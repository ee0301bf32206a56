"""`/v1/responses` jobs through the JobHandler on the tiny engine: a Responses request runs as the
chat job it means (the same prompt, the same greedy answer) and comes back as OpenAI's Response
object, every body validated strictly against `openai.types.responses.Response`; output items
(message, function_call, reasoning), `status` incomplete at max_output_tokens, logprobs under
`include`, structured text formats, function tools and multi-turn tool use, `reasoning.effort`
through the chat template, and the request's settings echoed. (Refusals by name:
test_responses_refusals.py; through Kafka and `sluice batch`: tests/service/test_conformance.py.)"""

from __future__ import annotations

import json
import time

import jsonschema
import msgspec
import pytest

from engine import EngineConfig, LLMEngine, RequestMetrics, RequestOutput
from schemas.codec import decode_job, decode_result, encode_result
from schemas.responses_api import ResponseBody
from service.config import ServiceConfig
from service.responses_api import to_chat_job
from service.responses_output import to_response_line
from service.translate import to_engine_request, to_result_line
from tests.service.openai_types import check_body
from tests.service.responses_jobs import CHAT, OK, RESPONSES, TOOL, running

# a chat template that reads a reasoning effort (as GPT-OSS's does) and renders tool turns
EFFORT_TEMPLATE = (
    "{{ bos_token }}Reasoning: {{ reasoning_effort | default('medium') }}\n"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}<|assistant|>"
)
ANALYSIS = "<|channel|>analysis<|message|>The user greets me.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Hello!"


@pytest.fixture(scope="module")
def effort_engine(tiny_checkpoint, tmp_path_factory) -> LLMEngine:
    """The tiny checkpoint with a chat template that reads `reasoning_effort` and renders tool turns."""
    folder = tmp_path_factory.mktemp("effort-model")
    for path in tiny_checkpoint.iterdir():
        if path.name != "chat_template.jinja":
            (folder / path.name).symlink_to(path)
    (folder / "chat_template.jinja").write_text(EFFORT_TEMPLATE)
    return LLMEngine(EngineConfig(dtype="float32", model=str(folder), max_model_len=256))


@pytest.fixture
async def handle(tiny_engine):
    async with running(tiny_engine) as run:
        yield run


@pytest.fixture
async def effort_handle(effort_engine):
    async with running(effort_engine) as run:
        yield run


def _items(body: dict, kind: str) -> list[dict]:
    return [item for item in body["output"] if item["type"] == kind]


def _text(body: dict) -> str:
    ((message,),) = [_items(body, "message")]
    ((part,),) = [message["content"]]
    assert part["type"] == "output_text" and part["annotations"] == []
    return part["text"]


# --- the Response object --------------------------------------------------------------------------


async def test_a_string_input_answers_as_the_chat_job_with_that_user_message_would(handle) -> None:
    response = await handle({"model": "tiny", "input": "Is the river cold?", "temperature": 0})
    chat = await handle(
        {"messages": [{"role": "user", "content": "Is the river cold?"}], "temperature": 0}, url=CHAT
    )
    assert response["status_code"] == 200
    body = response["body"]
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert body["model"] == "tiny" and abs(body["created_at"] - time.time()) < 60
    assert _text(body) == chat["body"]["choices"][0]["message"]["content"]
    usage, chat_usage = body["usage"], chat["body"]["usage"]
    assert usage["input_tokens"] == chat_usage["prompt_tokens"]
    assert usage["output_tokens"] == chat_usage["completion_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
    assert response["request_id"].startswith("req_")
    assert body["sluice"]["schema_version"] == 1


async def test_instructions_and_message_items_are_the_chat_messages_they_name(handle) -> None:
    response = await handle(
        {
            "instructions": "Be brief.",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Is it"},
                        {"type": "input_text", "text": "cold?"},
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Yes."}],
                },
                {"role": "user", "content": "Why?"},
            ],
            "temperature": 0,
        }
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is it\ncold?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Why?"},
    ]
    chat = await handle({"messages": messages, "temperature": 0}, url=CHAT)
    assert _text(response["body"]) == chat["body"]["choices"][0]["message"]["content"]
    assert response["body"]["usage"]["input_tokens"] == chat["body"]["usage"]["prompt_tokens"]
    assert response["body"]["instructions"] == "Be brief."


async def test_an_output_cut_at_max_output_tokens_is_incomplete_with_that_reason(handle) -> None:
    body = (await handle({"input": "Tell me a story", "max_output_tokens": 1, "temperature": 0}))["body"]
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 1 and body["max_output_tokens"] == 1
    (message,) = _items(body, "message")
    assert message["status"] == "incomplete" and message["role"] == "assistant"


async def test_logprobs_come_with_include_and_give_top_logprobs_alternatives(handle) -> None:
    body = (
        await handle(
            {
                "input": "Hi",
                "max_output_tokens": 4,
                "temperature": 0,
                "include": ["message.output_text.logprobs"],
                "top_logprobs": 2,
            }
        )
    )["body"]
    (part,) = _items(body, "message")[0]["content"]
    assert len(part["logprobs"]) == body["usage"]["output_tokens"] == 4
    for entry in part["logprobs"]:
        assert entry["logprob"] <= 0 and isinstance(entry["bytes"], list)
        assert len(entry["top_logprobs"]) == 2
        # greedy: the sampled token is the most probable one
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in entry["top_logprobs"]))
    assert "".join(entry["token"] for entry in part["logprobs"]) == part["text"]
    assert body["top_logprobs"] == 2


async def test_without_include_an_output_text_has_no_logprobs(handle) -> None:
    body = (await handle({"input": "Hi", "max_output_tokens": 3}))["body"]
    assert _items(body, "message")[0]["content"][0]["logprobs"] == []


async def test_top_logprobs_without_the_include_is_refused_not_ignored(handle) -> None:
    response = await handle({"input": "Hi", "top_logprobs": 2})
    assert response["status_code"] == 400
    assert (response["body"]["error"]["code"], response["body"]["error"]["param"]) == (
        "invalid_request",
        "top_logprobs",
    )


async def test_a_json_schema_text_format_holds_the_output_to_the_schema(handle) -> None:
    fmt = {"type": "json_schema", "name": "verdict", "schema": OK, "strict": True}
    body = (await handle({"input": "Is it ok?", "text": {"format": fmt}, "max_output_tokens": 40}))["body"]
    # the grammar ends the output: completed, not cut
    assert (body["status"], body["incomplete_details"]) == ("completed", None)
    assert _items(body, "message")[0]["status"] == "completed"
    jsonschema.validate(json.loads(_text(body)), OK)
    assert body["text"] == {"format": fmt, "verbosity": "medium"}


async def test_a_json_object_text_format_gives_a_json_object(handle) -> None:
    body = (
        await handle({"input": "x", "text": {"format": {"type": "json_object"}}, "max_output_tokens": 60})
    )["body"]
    if body["status"] == "completed":
        assert isinstance(json.loads(_text(body)), dict)
    assert body["text"]["format"] == {"type": "json_object"}


async def test_required_tool_choice_gives_function_call_items_and_no_message(handle) -> None:
    body = (
        await handle(
            {
                "input": "Is it ok?",
                "tools": [TOOL],
                "tool_choice": "required",
                "parallel_tool_calls": False,
                "temperature": 1,
                "seed": 3,
                "max_output_tokens": 60,
            }
        )
    )["body"]
    assert _items(body, "message") == []
    (call,) = _items(body, "function_call")
    assert call["name"] == "f" and call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    jsonschema.validate(json.loads(call["arguments"]), OK)
    assert call["status"] == "completed" and body["status"] == "completed"
    assert body["tools"] == [{**TOOL, "strict": None}]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("required", False)


async def test_a_named_function_choice_is_a_call_of_that_function(handle) -> None:
    tools = [TOOL, {**TOOL, "name": "g", "strict": True}]
    body = (
        await handle(
            {
                "input": "x",
                "tools": tools,
                "tool_choice": {"type": "function", "name": "g"},
                "max_output_tokens": 60,
            }
        )
    )["body"]
    (call,) = _items(body, "function_call")
    assert call["name"] == "g"
    jsonschema.validate(json.loads(call["arguments"]), OK)
    assert body["tool_choice"] == {"type": "function", "name": "g"}


async def test_the_requests_settings_are_echoed_as_openai_echoes_them(handle) -> None:
    body = (
        await handle(
            {
                "input": "Hi",
                "temperature": 0.5,
                "top_p": 0.9,
                "max_output_tokens": 3,
                "metadata": {"batch": "7"},
                "user": "u-1",
                "seed": 1,
                "store": False,
            }
        )
    )["body"]
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (0.5, 0.9, 3)
    assert (body["metadata"], body["user"]) == ({"batch": "7"}, "u-1")
    assert (body["tool_choice"], body["tools"], body["parallel_tool_calls"]) == ("auto", [], True)
    assert body["reasoning"] == {"effort": None, "summary": None}
    assert (body["truncation"], body["background"], body["previous_response_id"]) == ("disabled", False, None)
    assert body["error"] is None


async def test_defaults_are_echoed_when_the_request_leaves_them_out(handle) -> None:
    body = (await handle({"input": "Hi", "max_output_tokens": 2}))["body"]
    assert (body["temperature"], body["top_p"], body["metadata"], body["instructions"]) == (
        1.0,
        1.0,
        {},
        None,
    )
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "medium"}


async def test_a_seed_makes_a_sampled_response_repeatable(handle) -> None:
    job = {"input": "Once upon", "temperature": 1, "seed": 11, "max_output_tokens": 6}
    assert _text((await handle(job))["body"]) == _text((await handle(job))["body"])


# --- multi-turn tool use and reasoning effort (a template that reads them) -------------------------


def test_function_call_items_and_their_outputs_are_the_assistant_and_tool_turns() -> None:
    line = {
        "custom_id": "t",
        "url": RESPONSES,
        "body": {
            "input": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": '{"city": "Paris"}'},
                {"type": "function_call", "call_id": "call_2", "name": "w", "arguments": '{"city": "Rome"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "cold"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "warm"}],
                },
            ]
        },
    }
    chat = to_chat_job(decode_job(json.dumps(line).encode()), None)
    messages = msgspec.to_builtins(chat.body.messages)
    assert messages == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "content": "cold", "tool_call_id": "call_1"},
        {"role": "tool", "content": "warm", "tool_call_id": "call_2"},
    ]


async def test_a_tool_conversation_runs_on_a_model_whose_template_renders_tool_turns(effort_handle) -> None:
    response = await effort_handle(
        {
            "input": [
                {"role": "user", "content": "Is it ok?"},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"ok": true}'},
                {"type": "function_call_output", "call_id": "call_1", "output": '{"ok": true}'},
            ],
            "tools": [TOOL],
            "max_output_tokens": 3,
        }
    )
    assert response["status_code"] == 200, response["body"]


def _prompt(engine: LLMEngine, body: dict) -> str:
    job = to_chat_job(
        decode_job(json.dumps({"custom_id": "e", "url": RESPONSES, "body": body}).encode()),
        engine.tokenizer.chat_template,
    )
    return engine.tokenizer.decode(to_engine_request(job, engine.tokenizer, 8).prompt_token_ids)


def test_reasoning_effort_reaches_a_template_that_reads_it(effort_engine) -> None:
    assert "Reasoning: high" in _prompt(effort_engine, {"input": "Hi", "reasoning": {"effort": "high"}})
    assert "Reasoning: medium" in _prompt(effort_engine, {"input": "Hi"})


async def test_a_reasoning_effort_job_runs_and_echoes_its_effort(effort_handle) -> None:
    body = (await effort_handle({"input": "Hi", "reasoning": {"effort": "low"}, "max_output_tokens": 2}))[
        "body"
    ]
    assert body["reasoning"] == {"effort": "low", "summary": None}


def test_qwen3s_thinking_switch_is_off_for_no_effort_and_on_for_any_other() -> None:
    def kwargs(effort: str) -> dict:
        line = {"custom_id": "q", "url": RESPONSES, "body": {"input": "Hi", "reasoning": {"effort": effort}}}
        return to_chat_job(
            decode_job(json.dumps(line).encode()), "{% if enable_thinking %}"
        ).body.chat_template_kwargs

    assert kwargs("none") == kwargs("minimal") == {"enable_thinking": False}
    assert kwargs("low") == kwargs("high") == {"enable_thinking": True}


async def test_a_reasoning_effort_the_models_template_does_not_read_is_refused(handle, effort_handle) -> None:
    for run, effort in ((handle, "low"), (effort_handle, "minimal")):
        response = await run({"input": "Hi", "reasoning": {"effort": effort}})
        error = response["body"]["error"]
        assert (response["status_code"], error["code"], error["param"]) == (
            400,
            "unsupported_parameter",
            "reasoning.effort",
        )


# --- reasoning output items ----------------------------------------------------------------------


def _harmony_response(text: str, finish_reason: str = "stop") -> dict:
    """A Responses job's result line for an engine output `text`, on a service with the harmony parser."""
    line = {"custom_id": "h", "url": RESPONSES, "body": {"input": "Hi", "reasoning": {"effort": "low"}}}
    job = decode_job(json.dumps(line).encode())
    chat_job = to_chat_job(job, "{{ reasoning_effort }}")
    output = RequestOutput("h", [1, 2], [5, 6, 7, 8], text, finish_reason, RequestMetrics(time.time()))
    tokenizer = _WordTokenizer()
    chat_line = to_result_line(chat_job, output, "tiny", time.time(), tokenizer, reasoning_parser="harmony")
    body = msgspec.to_builtins(to_response_line(job, chat_line).response.body)
    check_body(RESPONSES, body)
    return body


class _WordTokenizer:
    """Counts the reasoning's tokens as words (the reasoning parser tokenises the reasoning again)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))


def test_the_reasoning_a_parser_splits_off_is_a_reasoning_item_before_the_message() -> None:
    body = _harmony_response(ANALYSIS + FINAL)
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "The user greets me."}]
    assert reasoning["summary"] == [] and reasoning["status"] == "completed"
    assert message["type"] == "message" and message["content"][0]["text"] == "Hello!"
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}


def test_an_output_cut_while_reasoning_is_an_incomplete_reasoning_item_alone() -> None:
    body = _harmony_response("<|channel|>analysis<|message|>The user gr", "length")
    (reasoning,) = body["output"]
    assert reasoning["status"] == "incomplete" and reasoning["content"][0]["text"] == "The user gr"
    assert body["status"] == "incomplete"


def test_a_response_result_round_trips_through_the_result_codec() -> None:
    line = {"custom_id": "h", "url": RESPONSES, "body": {"input": "Hi"}}
    job = decode_job(json.dumps(line).encode())
    output = RequestOutput("h", [1], [5], "yes", "stop", RequestMetrics(time.time()))
    result = to_response_line(job, to_result_line(to_chat_job(job, None), output, "tiny", time.time()))
    decoded = decode_result(encode_result(result))
    assert isinstance(decoded.response.body, ResponseBody) and decoded == result


async def test_on_a_service_with_a_reasoning_parser_the_engines_reasoning_is_a_reasoning_item(
    tiny_engine,
) -> None:
    """deepseek_r1 reads output with no `</think>` yet as all reasoning: the tiny model's text,
    cut at max_output_tokens, is an incomplete reasoning item with no message."""
    config = ServiceConfig(model_name="tiny", default_max_tokens=8, reasoning_parser="deepseek_r1")
    async with running(tiny_engine, config) as run:
        response = await run({"input": "Hi", "max_output_tokens": 6, "temperature": 0})
        chat = await run(
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}, url=CHAT
        )
    body = response["body"]
    (reasoning,) = body["output"]
    message = chat["body"]["choices"][0]["message"]
    assert reasoning["type"] == "reasoning" and reasoning["status"] == "incomplete"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": message["reasoning_content"]}]
    assert body["status"] == "incomplete" and message["content"] is None
    details = chat["body"]["usage"]["completion_tokens_details"]
    assert body["usage"]["output_tokens_details"] == details and details["reasoning_tokens"] > 0
