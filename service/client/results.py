"""What a client reads from a result line (decoded by schemas.codec.decode_result): the generated
text, the choice probabilities, the error, the token count and the token log-probabilities, from
a chat or text completion or a Response (its message items' text)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.batch import BatchResponseLine
from schemas.responses import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    ErrorBody,
    TextCompletion,
)
from schemas.responses_api import OutputMessage, ResponseBody


class ResultInfo(msgspec.Struct):
    text: str | None
    probabilities: dict[str, float] | None
    error: str | None
    completion_tokens: int


def read_result(result: BatchResponseLine) -> ResultInfo:
    """What a run needs from a result line: the text, the choice probabilities, the error, the token count."""
    error = result.error
    if error is None and result.response is not None and isinstance(result.response.body, ErrorBody):
        error = result.response.body.error  # the status says it failed; the top-level error is unset
    if error is not None:
        return ResultInfo(None, None, f"{error.code}: {error.message}", 0)
    if isinstance(response := _response(result), ResponseBody):
        parts = [part for item in response.output if isinstance(item, OutputMessage) for part in item.content]
        text = "".join(part.text for part in parts) if parts else None
        probabilities = response.sluice.choice_probabilities if response.sluice else None
        return ResultInfo(text, probabilities, None, response.usage.output_tokens)
    if (body := _completion(result)) is None:
        return ResultInfo(None, None, None, 0)
    match body.choices[0] if body.choices else None:
        case ChatChoice(message=message):
            text = message.content
        case CompletionChoice(text=text):
            pass
        case _:
            text = None
    probabilities = body.sluice.choice_probabilities if body.sluice is not None else None
    return ResultInfo(text, probabilities, None, body.usage.completion_tokens)


def token_logprobs(result: BatchResponseLine, alternatives: int | None = None) -> list[dict[str, Any]] | None:
    """Every generated token's log-probability and its top alternatives, from either endpoint's shape:
    `[{"token", "logprob", "top": [[token, logprob], ...]}]` (the teacher signal for distillation).

    `alternatives`: how many the job asked for. A completion's top_logprobs also hold the sampled
    token (OpenAI's and vLLM's shape: up to N + 1 entries); `top` keeps the N best of them, best
    first, as chat's alternatives are."""
    if isinstance(response := _response(result), ResponseBody):
        messages = [item for item in response.output if isinstance(item, OutputMessage)]
        return [
            {"token": t.token, "logprob": t.logprob, "top": [[a.token, a.logprob] for a in t.top_logprobs]}
            for item in messages
            for part in item.content
            for t in part.logprobs
        ] or None
    body = _completion(result)
    match body.choices[0].logprobs if body is not None and body.choices else None:
        case ChatLogprobs(content=tokens):  # chat: one entry per token
            return [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "top": [[a.token, a.logprob] for a in t.top_logprobs],
                }
                for t in tokens
            ]
        case CompletionLogprobs() as logprobs:  # completions: parallel lists
            tops = logprobs.top_logprobs or [{}] * len(logprobs.tokens)
            return [
                {"token": token, "logprob": logprob, "top": _best(top or {}, alternatives)}
                for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops, strict=False)
            ]
    return None


def _best(top: dict[str, float], alternatives: int | None) -> list[list[Any]]:
    ranked = sorted(top.items(), key=lambda item: -item[1])
    return [list(item) for item in ranked[:alternatives]]


def _response(result: BatchResponseLine):
    return result.response.body if result.response is not None else None


def _completion(result: BatchResponseLine) -> ChatCompletion | TextCompletion | None:
    body = result.response.body if result.response is not None else None
    return body if isinstance(body, ChatCompletion | TextCompletion) else None
