"""Constrained decoding: a StructuredOutputs spec -> a grammar matcher per sequence -> one token bitmask per step.

The grammars are llguidance's (choice and regex as Lark grammars, JSON schemas compiled by its
JSON compiler): a matcher follows one sequence's output and says, before each token, which
vocabulary ids may come next; EOS is among them only where the grammar is complete. One step's
masks are packed into a single [N, ceil(V / 32)] int32 bitmask (bit j of word i: token
32 * i + j allowed) filled on the host, as llguidance requires, then copied to the device once
and applied to the whole batch's logits by the sampler.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.hf
import torch

from engine.sampling_params import StructuredOutputs

_ANY_JSON_OBJECT = {"type": "object"}
# One fixed layout, `{"a": 1, "b": [2, 3]}`: llguidance's default lets the model put any run of
# whitespace between tokens, which a weak or unsure model fills until max_tokens. A schema's
# own "x-guidance" options override this.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidStructuredOutput(ValueError):
    """The spec's schema or regex cannot be compiled; the message names the problem."""


class GrammarCompiler:
    """Compiles specs against one tokenizer; the llguidance tokenizer is built once, on first use (~1 s)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size  # the model's: the masks must span its logits
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the output. Raises InvalidStructuredOutput."""
        grammar = _grammar(spec)
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidStructuredOutput(f"invalid {_kind(spec)}: {_first_line(matcher.get_error())}")
        return matcher

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            eos = self._eos_token_ids or None
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=eos
            )
        return self._ll_tokenizer


def token_bitmask(matchers: list[llguidance.LLMatcher | None], vocab_size: int) -> torch.Tensor | None:
    """[N, ceil(V / 32)] int32 on the host: row i from matchers[i], all ones where it is None.

    None when no row is constrained, so an unconstrained step costs nothing.
    """
    rows = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return None
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    # written in place by Rust with the GIL released; a matcher in error allows only EOS
    if len(rows) == 1:
        matcher, row = rows[0]
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
    else:  # several rows: llguidance's thread pool computes them in parallel
        _executor().unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(matchers))
    return bitmask


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def _grammar(spec: StructuredOutputs) -> str:
    try:
        if spec.choice is not None:
            # each choice a Lark string literal: "a" | "b", so the output is exactly one of them
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice) for choice in spec.choice)
            )
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        schema = _ANY_JSON_OBJECT if spec.json_object else spec.json
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_LAYOUT)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InvalidStructuredOutput(f"invalid {_kind(spec)}: {_first_line(str(e))}") from None


def _kind(spec: StructuredOutputs) -> str:
    if spec.choice is not None:
        return "choice"
    if spec.regex is not None:
        return "regex"
    return "JSON schema"


def _first_line(message: str) -> str:
    # llguidance's messages end in a multi-line source excerpt; the first lines say what is wrong
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "unknown error"
