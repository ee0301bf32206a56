"""The choices of a result line: one per returned sample, by index, as chat messages or completion texts."""

from __future__ import annotations

from engine import RequestOutput
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses import AssistantMessage, ChatChoice, CompletionChoice
from service.logprobs import chat_logprobs, completion_logprobs
from service.reasoning import split_reasoning
from service.tools import parser_for, tool_calls_of, tool_mode


def result_choices(
    body,
    output: RequestOutput,
    samples: list[RequestOutput],
    tokenizer,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "none",
) -> list:
    """One choice per returned sample, by index (chat messages or completion texts)."""
    as_ids = bool(body.return_tokens_as_token_ids)
    if isinstance(body, ChatCompletionRequest):
        parsers = (tool_call_parser, reasoning_parser)
        return [_chat_choice(body, i, s, tokenizer, parsers, as_ids) for i, s in enumerate(samples)]
    echo = _completion_echo(body, output, tokenizer)
    return [
        CompletionChoice(
            index=i,
            text=echo + s.text,
            finish_reason=s.finish_reason,
            logprobs=None if s.logprobs is None else completion_logprobs(s.logprobs, tokenizer, as_ids),
            stop_reason=s.stop_reason,
        )
        for i, s in enumerate(samples)
    ]


def _chat_echo(body: ChatCompletionRequest) -> str:
    """vLLM's chat echo: a final assistant message (a prefill) comes before the new content."""
    last = body.messages[-1]
    return last.text if body.echo and last.role == "assistant" else ""


def _completion_echo(body: CompletionRequest, output: RequestOutput, tokenizer) -> str:
    if not body.echo:
        return ""
    if isinstance(body.prompt, str) and body.truncate_prompt_tokens is None:
        return body.prompt
    return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=body.skip_special_tokens)


def _chat_choice(
    body: ChatCompletionRequest, index: int, sample: RequestOutput, tokenizer, parsers: tuple, as_ids
):
    reasoning, text = split_reasoning(sample.text, parsers[1], sample.finish_reason == "length")
    content, tool_calls = _tool_calls(body, text or "", tokenizer, parsers)
    if tool_calls:
        message = AssistantMessage(content=content, tool_calls=tool_calls)
    else:
        echo = _chat_echo(body)
        message = AssistantMessage(content=None if text is None and not echo else echo + (text or ""))
    if reasoning is not None and body.include_reasoning is not False:
        message.reasoning_content = message.reasoning = reasoning
    # OpenAI: "tool_calls" when the model chose to call; "stop" when a named function was forced
    called = tool_calls and tool_mode(body) in ("auto", "required")
    return ChatChoice(
        index=index,
        message=message,
        finish_reason="tool_calls" if called else sample.finish_reason,
        logprobs=None if sample.logprobs is None else chat_logprobs(sample.logprobs, tokenizer, as_ids),
        stop_reason=sample.stop_reason,
    )


def _tool_calls(body: ChatCompletionRequest, text: str, tokenizer, parsers: tuple):
    """(content, tool calls) of one sample's text under the job's tool_choice."""
    configured, reasoning_parser = parsers
    template = body.chat_template or getattr(tokenizer, "chat_template", None)
    parser = parser_for(configured, template, reasoning_parser)
    return tool_calls_of(text, tool_mode(body), parser, body.parallel_tool_calls is not False)
