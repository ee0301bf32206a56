"""The choices of a result line: one per returned sample, by index, as chat messages or completion texts."""

from __future__ import annotations

from engine import RequestOutput
from schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
)
from service.logprobs import chat_logprobs, completion_logprobs


def result_choices(body, output: RequestOutput, samples: list[RequestOutput], tokenizer) -> list:
    """One choice per returned sample, by index (chat messages or completion texts)."""
    as_ids = bool(body.return_tokens_as_token_ids)
    if isinstance(body, ChatCompletionRequest):
        echo = _chat_echo(body)
        return [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=echo + s.text),
                finish_reason=s.finish_reason,
                logprobs=None if s.logprobs is None else chat_logprobs(s.logprobs, tokenizer, as_ids),
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(samples)
        ]
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
