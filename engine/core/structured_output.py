"""Constrained decoding: a StructuredOutputs spec -> a grammar matcher per sequence -> one token bitmask per step.

The grammars are llguidance's (choice and regex as Lark grammars, JSON schemas compiled by its
JSON compiler): a matcher follows one sequence's output and says, before each token, which
vocabulary ids may come next; EOS is among them only where the grammar is complete. One step's
masks are packed into a single [R, ceil(V / 32)] int32 bitmask (bit j of word i: token
32 * i + j allowed), one row per constrained sampling row only (`GrammarMasks`), filled on the
host, as llguidance requires, then copied to the device once and applied to those rows' logits
by the sampler: the batch's unconstrained rows cost nothing.

With async scheduling a step is planned before the tokens of the step still running are read
back, so its grammars cannot say yet what may come next. Its masks come late (`LateGrammarMasks`):
the model thread runs the forward without them and waits for them only at sampling, while the
host reads the running step's tokens, feeds them to the grammars and fills the masks.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future
from typing import NamedTuple

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


class GrammarMasks(NamedTuple):
    """One step's grammar masks, for its constrained sampling rows only."""

    rows: torch.Tensor  # [R] int64: the sampling rows under a grammar, ascending
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32: bit j of word i allows token 32 * i + j


def grammar_masks(matchers: list[llguidance.LLMatcher | None], vocab_size: int) -> GrammarMasks | None:
    """The masks of the rows whose matcher is not None (matchers[i]: sampling row i's grammar).

    None when no row is constrained, so an unconstrained step costs nothing.
    """
    constrained = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
    if not constrained:
        return None
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(constrained), words), -1, dtype=torch.int32)
    # written in place by Rust with the GIL released; a matcher in error allows only EOS
    if len(constrained) == 1:
        constrained[0][0].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:  # several rows: llguidance's thread pool computes them in parallel
        targets = [(matcher, i) for i, (matcher, _) in enumerate(constrained)]
        _executor().unsafe_compute_mask_ptr(targets, bitmask.data_ptr(), words * 4, len(constrained))
    rows = torch.tensor([row for _, row in constrained], dtype=torch.int64)
    return GrammarMasks(rows, bitmask)


class LateGrammarMasks:
    """The grammar masks of a step scheduled ahead, filled by the host once the step before it
    is read back, waited for by the sampler. `rows`: the step's sampling sequences, in order;
    a sequence without a grammar, or finished by the step before (its token here is thrown
    away), is unconstrained. Settled exactly once: filled, or failed with an error (the
    model thread then raises it, and the step is requeued like any failed model run)."""

    def __init__(self, rows: list, vocab_size: int) -> None:
        self._rows = rows  # engine.core.sequence.Sequence
        self._vocab_size = vocab_size
        self._future: Future[GrammarMasks | None] = Future()

    def fill(self) -> None:
        """Compute the masks from the grammars as they are now (after the running step's tokens)."""
        if self._future.done():
            return
        try:
            rows = [None if seq.is_finished else seq.grammar for seq in self._rows]
            self._future.set_result(grammar_masks(rows, self._vocab_size))
        except Exception as e:  # not expected (a matcher in error allows EOS): fail the step, not hang it
            self._future.set_exception(e)

    def fail(self, error: BaseException) -> None:
        """Never filled: the step before failed, or the engine is closing."""
        if not self._future.done():
            self._future.set_exception(error)

    def wait(self) -> GrammarMasks | None:
        """On the model thread, at sampling: the masks, or None (no row constrained now)."""
        return self._future.result()


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
