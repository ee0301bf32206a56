"""Reasoning parsers: a chat output split into its reasoning and its answer (`reasoning_parser`).

- `harmony` (GPT-OSS): the output is messages `<|channel|>C<|message|>BODY<|end|>`, each after
  `<|start|>assistant` (the generation prompt opens the first). `analysis` bodies are the
  reasoning; `final` bodies the content. A `commentary` message (a preamble, or a tool call
  addressed `to=functions.NAME`) is not parsed here: it stays in the content verbatim, tags and
  all, so nothing is lost, and the tool call parser (service/tools.py, `harmony`) turns the
  calls among it into tool calls when the job has tools. Text with no `<|channel|>` tag is all content. Cut short (max_tokens),
  an unfinished message keeps what it has, less a half-written tag; no final channel yet:
  content null and the reasoning so far.
- `deepseek_r1`: `<think>REASONING</think>CONTENT`, the opening tag optional (R1's template
  writes it into the prompt); with no `</think>` yet, all of it is reasoning.
- `none`: no split; the text is the content.
`auto` picks harmony for GptOssForCausalLM checkpoints and none otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REASONING_PARSERS = ("none", "harmony", "deepseek_r1")

_HARMONY_ARCHITECTURES = {"GptOssForCausalLM"}
_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*(\w*)")
_END_TAGS = re.compile(r"<\|(?:end|return|call)\|>")
_TAGS = (_START, _CHANNEL, _MESSAGE, "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")


def resolve_reasoning_parser(configured: str, architectures: Sequence[str]) -> str:
    """The parser to run: the configured one, or for `auto` the one the architecture speaks."""
    if configured != "auto":
        return configured
    return "harmony" if _HARMONY_ARCHITECTURES.intersection(architectures) else "none"


def split_reasoning(text: str, parser: str, is_cut: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, content) of one chat output; reasoning is None where the output has none.

    is_cut: the output ended at max_tokens, so its last tag may be half-written (dropped)."""
    if parser == "harmony":
        return _harmony(text, is_cut)
    if parser == "deepseek_r1":
        return _think(text, is_cut)
    return None, text


def num_reasoning_tokens(texts_and_cuts, parser: str, tokenizer) -> int:
    """The tokens of the reasoning split off each (text, is_cut) output, summed: OpenAI's
    `usage.completion_tokens_details.reasoning_tokens`. The reasoning text is tokenised again
    (without special tokens): the tags around it are not counted, and a piece of reasoning that
    the model wrote in other tokens than the tokenizer would pick counts as the tokenizer's."""
    total = 0
    for text, is_cut in texts_and_cuts:
        reasoning, _ = split_reasoning(text, parser, is_cut)
        if reasoning:
            total += len(tokenizer.encode(reasoning, add_special_tokens=False))
    return total


def _harmony(text: str, is_cut: bool) -> tuple[str | None, str | None]:
    if _CHANNEL not in text:
        return None, text
    reasoning: list[str] = []
    content: list[str] = []
    for i, chunk in enumerate(text.split(_START)):
        header, has_body, body = chunk.partition(_MESSAGE)
        channel = _CHANNEL_NAME.search(header)
        if channel is None or not has_body:
            continue  # a role alone, or a header cut short: nothing of the message yet
        body, *ended = _END_TAGS.split(body, 1)
        if is_cut and not ended:
            body = _strip_partial_tag(body)
        if channel[1] == "analysis":
            reasoning.append(body)
        elif channel[1] == "final":
            content.append(body)
        else:  # commentary (and any other channel): verbatim, as generated
            content.append(chunk if i == 0 else _START + chunk)
    return ("\n".join(reasoning) if reasoning else None), ("".join(content) or None)


def _think(text: str, is_cut: bool) -> tuple[str | None, str | None]:
    text = text.removeprefix("<think>")
    if "</think>" not in text:
        return (_strip_partial(text, "</think>") if is_cut else text), None
    reasoning, _, content = text.partition("</think>")
    return reasoning, content or None


def _strip_partial_tag(body: str) -> str:
    for tag in _TAGS:
        body = _strip_partial(body, tag)
    return body


def _strip_partial(text: str, tag: str) -> str:
    """The text less a start of `tag` at its end (an output cut while writing the tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return text[:-length]
    return text
