"""Reasoning parsers: harmony channels and `<think>` tags split into reasoning and content; the
choice on the wire (`reasoning_content`, `reasoning`), `include_reasoning: false`, and `auto`
choosing harmony by the checkpoint's architecture."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
from transformers import AutoTokenizer

from engine import EngineConfig, LLMEngine, RequestMetrics, RequestOutput
from engine.async_engine import AsyncLLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from schemas.codec import decode_job
from schemas.responses import AssistantMessage
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.limits import JobLimits
from service.reasoning import resolve_reasoning_parser, split_reasoning
from service.translate import to_engine_request, to_result_line

ANALYSIS = "<|channel|>analysis<|message|>The user greets me.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Hello!"


def test_harmony_analysis_is_the_reasoning_and_final_the_content() -> None:
    assert split_reasoning(ANALYSIS + FINAL + "<|return|>", "harmony") == ("The user greets me.", "Hello!")


def test_harmony_output_without_channel_tags_is_all_content() -> None:
    assert split_reasoning("Just an answer.", "harmony") == (None, "Just an answer.")


def test_harmony_output_with_only_analysis_has_null_content() -> None:
    assert split_reasoning(ANALYSIS, "harmony") == ("The user greets me.", None)


def test_harmony_cut_inside_the_analysis_keeps_the_reasoning_so_far_less_a_half_tag() -> None:
    text = "<|channel|>analysis<|message|>The user gr<|en"
    assert split_reasoning(text, "harmony", is_cut=True) == ("The user gr", None)


def test_harmony_cut_inside_the_final_header_gives_no_content_yet() -> None:
    for cut in (
        "<|start|>assistant<|chan",
        "<|start|>assistant<|channel|>fin",
        "<|start|>assistant<|channel|>final<|mess",
    ):
        assert split_reasoning(ANALYSIS + cut, "harmony", is_cut=True) == ("The user greets me.", None)


def test_harmony_cut_inside_the_final_message_keeps_its_text() -> None:
    assert split_reasoning(ANALYSIS + FINAL + "<|re", "harmony", is_cut=True) == (
        "The user greets me.",
        "Hello!",
    )


def test_harmony_text_ending_like_a_tag_is_kept_when_the_output_was_not_cut() -> None:
    text = ANALYSIS + "<|start|>assistant<|channel|>final<|message|>a <"
    assert split_reasoning(text, "harmony") == ("The user greets me.", "a <")


def test_harmony_commentary_stays_in_the_content_verbatim() -> None:
    call = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    assert split_reasoning(ANALYSIS + call, "harmony") == ("The user greets me.", call)


def test_deepseek_r1_splits_at_the_closing_think_tag() -> None:
    assert split_reasoning("<think>Hmm.</think>Yes.", "deepseek_r1") == ("Hmm.", "Yes.")
    assert split_reasoning("Hmm.</think>Yes.", "deepseek_r1") == ("Hmm.", "Yes.")


def test_deepseek_r1_without_a_closing_tag_is_all_reasoning() -> None:
    assert split_reasoning("<think>Hmm, let me", "deepseek_r1") == ("Hmm, let me", None)
    assert split_reasoning("<think>Hmm.</thi", "deepseek_r1", is_cut=True) == ("Hmm.", None)


def test_no_parser_leaves_the_text_as_the_content() -> None:
    assert split_reasoning(ANALYSIS + FINAL, "none") == (None, ANALYSIS + FINAL)


def test_auto_picks_harmony_for_gpt_oss_only() -> None:
    assert resolve_reasoning_parser("auto", ["GptOssForCausalLM"]) == "harmony"
    assert resolve_reasoning_parser("auto", ["LlamaForCausalLM"]) == "none"
    assert resolve_reasoning_parser("deepseek_r1", ["GptOssForCausalLM"]) == "deepseek_r1"


def _message(text: str, finish_reason: str = "stop", reasoning_parser: str = "harmony", **body) -> dict:
    line = {
        "custom_id": "r",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "Hi"}], **body},
    }
    output = RequestOutput("r", [1, 2], [5, 6, 7], text, finish_reason, RequestMetrics(time.time()))
    job = decode_job(json.dumps(line).encode())
    result = to_result_line(job, output, "tiny", time.time(), reasoning_parser=reasoning_parser)
    return msgspec.to_builtins(result.response.body.choices[0])


def test_result_message_carries_the_reasoning_under_both_vllm_names() -> None:
    choice = _message(ANALYSIS + FINAL)
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "The user greets me.",
        "reasoning": "The user greets me.",
    }
    assert choice["finish_reason"] == "stop"


def test_include_reasoning_false_drops_the_reasoning() -> None:
    message = _message(ANALYSIS + FINAL, include_reasoning=False)["message"]
    assert message == {"role": "assistant", "content": "Hello!"}


def test_a_message_without_reasoning_encodes_as_before() -> None:
    assert msgspec.json.encode(AssistantMessage(content="x")) == b'{"role":"assistant","content":"x"}'
    assert _message("plain", reasoning_parser="none")["message"] == {"role": "assistant", "content": "plain"}


# the harmony conversation the GPT-OSS chat template renders, the generation prompt last
HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
    "<|start|>assistant"
)
# the tiny model's weights are random: a regex makes it write harmony
HARMONY_OUTPUT = (
    r"<\|channel\|>analysis<\|message\|>the user says hi<\|end\|>"
    r"<\|start\|>assistant<\|channel\|>final<\|message\|>(yes|no)"
)


@pytest.fixture(scope="module")
def gpt_oss_engine(model_cache) -> LLMEngine:
    folder = ensure_checkpoint(model_cache, preset="tiny-gpt-oss")
    return LLMEngine(EngineConfig(dtype="float32", model=str(folder), max_model_len=256))


@pytest.fixture
async def gpt_oss_body(gpt_oss_engine):
    """A harmony chat job's response body, run by a JobHandler on the tiny GPT-OSS checkpoint."""
    engine = AsyncLLMEngine(gpt_oss_engine)
    engine.start()
    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1)
    # reasoning_parser "auto" (the default) reads the checkpoint's architecture: harmony
    handler = JobHandler(
        ServiceConfig(
            model_name="tiny", default_max_tokens=8, limits=JobLimits(allow_job_chat_template=True)
        ),
        batcher,
        gpt_oss_engine,
    )

    async def run(**body):
        messages = [{"role": "user", "content": "Hi"}]
        body = {"messages": messages, "chat_template": HARMONY_TEMPLATE, "temperature": 0, **body}
        job = {"custom_id": "h", "url": "/v1/chat/completions", "body": body}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        return msgspec.to_builtins(outcome.result.response.body)

    yield run
    await handler.stop()
    await engine.stop()


@pytest.fixture
def gpt_oss_handle(gpt_oss_body):
    """The first choice of a harmony chat job's response body."""

    async def run(**body):
        return (await gpt_oss_body(**body))["choices"][0]

    return run


async def test_gpt_oss_job_returns_the_analysis_channel_as_reasoning_apart_from_the_answer(
    gpt_oss_handle,
) -> None:
    choice = await gpt_oss_handle(structured_outputs={"regex": HARMONY_OUTPUT}, max_tokens=120)
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] in ("yes", "no")
    assert choice["message"]["reasoning_content"] == choice["message"]["reasoning"] == "the user says hi"


async def test_gpt_oss_job_cut_before_the_final_channel_gives_null_content_and_the_reasoning_so_far(
    gpt_oss_handle,
) -> None:
    choice = await gpt_oss_handle(structured_outputs={"regex": HARMONY_OUTPUT}, max_tokens=40)
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning"] and "the user says hi".startswith(choice["message"]["reasoning"])


async def test_usage_counts_the_reasoning_tokens_a_reasoning_parser_split_off(
    gpt_oss_body, gpt_oss_engine
) -> None:
    """Issue 30, defect 8: `usage.completion_tokens_details.reasoning_tokens` (OpenAI's) was absent."""
    body = await gpt_oss_body(structured_outputs={"regex": HARMONY_OUTPUT}, max_tokens=120)
    reasoning_tokens = gpt_oss_engine.tokenizer.encode("the user says hi", add_special_tokens=False)
    details = body["usage"]["completion_tokens_details"]
    assert details == {"reasoning_tokens": len(reasoning_tokens)}
    assert 0 < details["reasoning_tokens"] < body["usage"]["completion_tokens"]


def test_reasoning_tokens_are_zero_without_reasoning_and_absent_without_a_reasoning_parser(
    tiny_checkpoint,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    line = {
        "custom_id": "r",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "Hi"}]},
    }
    job = decode_job(json.dumps(line).encode())
    output = RequestOutput(
        "r", [1, 2], [5, 6, 7], "<think>a b c</think>yes", "stop", RequestMetrics(time.time())
    )

    def usage(parser: str) -> dict:
        result = to_result_line(job, output, "tiny", time.time(), tokenizer, reasoning_parser=parser)
        return msgspec.to_builtins(result.response.body.usage)

    expected = len(tokenizer.encode("a b c", add_special_tokens=False))
    assert usage("deepseek_r1")["completion_tokens_details"] == {"reasoning_tokens": expected}
    assert usage("harmony")["completion_tokens_details"] == {"reasoning_tokens": 0}  # no channel tags
    assert "completion_tokens_details" not in usage("none")


def test_harmony_chat_jobs_keep_special_tokens_in_the_text_so_the_channel_tags_survive(
    gpt_oss_engine,
) -> None:
    chat = decode_job(
        json.dumps(
            {
                "custom_id": "h",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "Hi"}]},
            }
        ).encode()
    )
    completion = decode_job(
        json.dumps({"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "Hi"}}).encode()
    )
    tokenizer = gpt_oss_engine.tokenizer
    assert not to_engine_request(chat, tokenizer, 8, reasoning_parser="harmony").params.skip_special_tokens
    assert to_engine_request(chat, tokenizer, 8, reasoning_parser="none").params.skip_special_tokens
    assert to_engine_request(completion, tokenizer, 8, reasoning_parser="harmony").params.skip_special_tokens


# GPT-OSS's template renders the tools as a developer message (a TypeScript namespace)
HARMONY_TOOLS_TEMPLATE = (
    "{% if tools %}<|start|>developer<|message|># Tools\n\nnamespace functions {\n"
    "{% for t in tools %}type {{ t.function.name }} = (_: any) => any;\n{% endfor %}}<|end|>{% endif %}"
    + HARMONY_TEMPLATE
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
HARMONY_CALL_OUTPUT = (
    r"<\|channel\|>analysis<\|message\|>need the weather<\|end\|>"
    r"<\|start\|>assistant<\|channel\|>commentary to=functions\.get_weather <\|constrain\|>json"
    r'<\|message\|>\{"city": "(Paris|Rome)"\}<\|call\|>'
)


async def test_gpt_oss_job_with_tools_returns_the_harmony_call_as_tool_calls(gpt_oss_handle) -> None:
    choice = await gpt_oss_handle(
        tools=[WEATHER_TOOL],
        chat_template=HARMONY_TOOLS_TEMPLATE,
        structured_outputs={"regex": HARMONY_CALL_OUTPUT},
        max_tokens=200,
    )
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning"] == "need the weather"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")


def test_gpt_oss_tools_are_rendered_into_the_prompt_by_the_chat_template(gpt_oss_engine) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER_TOOL]}
    job = {
        "custom_id": "h",
        "url": "/v1/chat/completions",
        "body": {**body, "chat_template": HARMONY_TOOLS_TEMPLATE},
    }
    request = to_engine_request(decode_job(json.dumps(job).encode()), gpt_oss_engine.tokenizer, 8)
    prompt = gpt_oss_engine.tokenizer.decode(request.prompt_token_ids)
    assert "namespace functions {\ntype get_weather = (_: any) => any;\n}" in prompt
