"""Engine logprobs -> OpenAI's two logprobs shapes (chat `content` list, completions parallel lists).

A token's `bytes` are the token's own bytes (byte-level BPE pieces mapped back to bytes,
SentencePiece byte fallbacks `<0xNN>` as their byte), not its decoded text re-encoded: a token
holding half of a UTF-8 character decodes to U+FFFD, but its bytes are the half it holds.
`return_tokens_as_token_ids` writes each token as `token_id:N` (vLLM's), for tokens that are
not text on their own.
"""

from __future__ import annotations

import functools
import re

from engine import OutputLogprob
from schemas.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def chat_logprobs(logprobs: list[OutputLogprob], tokenizer, as_token_ids: bool = False) -> ChatLogprobs:
    text = _token_texts(logprobs, tokenizer, as_token_ids)
    raw = _token_bytes(logprobs, tokenizer)
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=text[lp.token_id],
                logprob=lp.logprob,
                bytes=raw[lp.token_id],
                top_logprobs=[
                    TopLogprob(token=text[tid], logprob=value, bytes=raw[tid]) for tid, value in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(
    logprobs: list[OutputLogprob], tokenizer, as_token_ids: bool = False
) -> CompletionLogprobs:
    text = _token_texts(logprobs, tokenizer, as_token_ids)
    offsets, offset = [], 0
    for lp in logprobs:
        offsets.append(offset)
        offset += len(text[lp.token_id])
    return CompletionLogprobs(
        tokens=[text[lp.token_id] for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[_top_with_sampled(lp, text) for lp in logprobs],
        text_offset=offsets,
    )


def _top_with_sampled(lp: OutputLogprob, text: dict[int, str]) -> dict[str, float]:
    """A completion token's alternatives with the sampled token always among them, first: up to
    `logprobs` + 1 entries, as OpenAI and vLLM give them (`logprobs: 0` gives the sampled one)."""
    top = {text[lp.token_id]: lp.logprob}
    for token_id, value in lp.top:
        top.setdefault(text[token_id], value)
    return top


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The bytes a token stands for in the text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return list(tokenizer.decode([token_id]).encode())
    if token_id in tokenizer.all_special_ids:
        return list(piece.encode())
    if (byte := _BYTE_FALLBACK.fullmatch(piece)) is not None:  # SentencePiece's byte fallback
        return [int(byte.group(1), 16)]
    if _is_byte_level(tokenizer):
        decoder = _byte_decoder()
        if all(ch in decoder for ch in piece):
            return [decoder[ch] for ch in piece]
    if "\u2581" in piece:  # SentencePiece's word boundary
        return list(piece.replace("\u2581", " ").encode())
    return list(tokenizer.decode([token_id]).encode())


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_texts(logprobs: list[OutputLogprob], tokenizer, as_token_ids: bool) -> dict[int, str]:
    """Each token id's own text, decoded once per result."""
    ids = {lp.token_id for lp in logprobs} | {tid for lp in logprobs for tid, _ in lp.top}
    if as_token_ids:
        return {tid: f"token_id:{tid}" for tid in ids}
    return {tid: tokenizer.decode([tid]) for tid in ids}


def _token_bytes(logprobs: list[OutputLogprob], tokenizer) -> dict[int, list[int]]:
    ids = {lp.token_id for lp in logprobs} | {tid for lp in logprobs for tid, _ in lp.top}
    return {tid: token_bytes(tokenizer, tid) for tid in ids}


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's pieces are GPT-2's byte-to-unicode characters (byte-level BPE)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible map: printable bytes stand for themselves, the others are shifted past 255
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
