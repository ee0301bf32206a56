"""Engine logprobs -> OpenAI's two logprobs shapes (chat `content` list, completions parallel lists)."""

from __future__ import annotations

from engine import OutputLogprob
from schemas.openai import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def chat_logprobs(logprobs: list[OutputLogprob], tokenizer) -> ChatLogprobs:
    text = _token_texts(logprobs, tokenizer)
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=text[lp.token_id],
                logprob=lp.logprob,
                bytes=list(text[lp.token_id].encode()),
                top_logprobs=[
                    TopLogprob(token=text[tid], logprob=value, bytes=list(text[tid].encode()))
                    for tid, value in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(logprobs: list[OutputLogprob], tokenizer) -> CompletionLogprobs:
    text = _token_texts(logprobs, tokenizer)
    offsets, offset = [], 0
    for lp in logprobs:
        offsets.append(offset)
        offset += len(text[lp.token_id])
    return CompletionLogprobs(
        tokens=[text[lp.token_id] for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{text[tid]: value for tid, value in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


def _token_texts(logprobs: list[OutputLogprob], tokenizer) -> dict[int, str]:
    """Each token id's own text, decoded once per result."""
    ids = {lp.token_id for lp in logprobs} | {tid for lp in logprobs for tid, _ in lp.top}
    return {tid: tokenizer.decode([tid]) for tid in ids}
