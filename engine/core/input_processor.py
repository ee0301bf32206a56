"""InputProcessor: add_request's arguments -> a Sequence, or RequestRejected before anything is queued.

It tokenises a text prompt, checks the prompt against the model and the KV pool, clips
max_tokens to the model's length limit, compiles a structured output's grammar and tokenises
a `choice` request's choices; every refusal names what is wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.core.sequence import Sequence
from engine.core.structured_output import GrammarCompiler, InvalidStructuredOutput
from engine.sampling_params import SamplingParams

MAX_PRIORITY = 1000  # priorities lie in [-MAX_PRIORITY, MAX_PRIORITY], so that aging bounds every wait


class RequestRejected(ValueError):
    """The request cannot run on this engine (too long, bad token ids); nothing was queued.

    `code` names the kind of problem for callers that report it (the service's error codes),
    `param` the parameter at fault where one is (None: the prompt itself).
    """

    def __init__(self, message: str, code: str = "invalid_prompt", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param  # the request parameter at fault, where there is one


@dataclass(slots=True)
class ProcessedRequest:
    seq: Sequence
    choice_token_ids: list[list[int]] | None  # a `choice` request's choices, each tokenised with EOS


class InputProcessor:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        num_kv_blocks: int,  # the whole KV pool
        block_size: int,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.grammars = GrammarCompiler(tokenizer, vocab_size, set(eos_token_ids))
        # the EOS that ends each choice when it is scored
        self.choice_eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_token_ids)

    def process(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int
    ) -> ProcessedRequest:
        if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise RequestRejected(
                f"priority must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority}",
                code="invalid_request",
            )
        self._check_lora(params.lora_name)
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids)
        params = self._resolve(params)
        spec = params.structured_outputs
        max_tokens = params.max_tokens
        if is_greedy_choice(params):
            # scored, not decoded: its answer is the most probable choice (ChoiceScorer)
            max_tokens = 0
        elif spec is not None and spec.choice is not None:
            # room for any choice in any tokenisation (every token but EOS holds at least one
            # byte), so that a choice is never cut short: the output is always one of them
            longest = max(len(choice.encode()) for choice in spec.choice)
            max_tokens = max(max_tokens, longest + 1)
        max_tokens = min(max_tokens, self.max_model_len - len(token_ids))
        self._check_fits(len(token_ids), max_tokens)
        seq = Sequence(request_id, token_ids, params, max_tokens, priority)
        choice_token_ids = None
        if spec is not None and not seq.is_prefill_only:
            try:
                seq.grammar = self.grammars.matcher(spec)
            except InvalidStructuredOutput as e:
                raise RequestRejected(str(e), code="invalid_structured_output") from None
        if spec is not None and spec.choice is not None:
            choice_token_ids = self._choice_token_ids(len(token_ids), spec.choice)
        return ProcessedRequest(seq, choice_token_ids)

    def process_pooling(
        self, request_id: str, prompt: str | list[int], pooling: str, priority: int
    ) -> Sequence:
        """A pooling request's sequence: prefill only, its hidden states pooled (engine/core/pooling.py)."""
        if self.config.pipeline_parallel_size > 1:
            raise RequestRejected("pooling (embedding) requests need pipeline_parallel_size 1")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids, for_generation=False)
        self._check_fits(len(token_ids), 0)
        seq = Sequence(request_id, token_ids, SamplingParams(max_tokens=1, temperature=0.0), 0, priority)
        seq.pooling = pooling
        return seq

    def fork_grammar(self, seq: Sequence):
        """A fresh grammar matcher for a sequence forked from a request (None: unconstrained)."""
        spec = seq.params.structured_outputs
        return None if spec is None or seq.is_prefill_only else self.grammars.matcher(spec)

    def _resolve(self, params: SamplingParams) -> SamplingParams:
        """The params with what only the engine knows filled in; refuses token ids outside the vocabulary."""
        bad = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad:
            raise RequestRejected(
                f"token ids {bad[:5]} of logit_bias are outside the vocabulary [0, {self.vocab_size})",
                code="invalid_request",
                param="logit_bias",
            )
        if params.min_tokens == 0:
            return params
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        in_vocab = frozenset(t for t in stop_ids if t < self.vocab_size)  # others are never sampled
        return dataclasses.replace(params, min_tokens_stop_ids=in_vocab)

    def _check_lora(self, lora_name: str | None) -> None:
        if lora_name is not None and lora_name not in self.config.lora_adapters:
            names = ", ".join(sorted(self.config.lora_adapters)) or "none"
            raise RequestRejected(
                f"unknown LoRA adapter {lora_name!r}; this engine's adapters: {names}",
                code="model_not_found",
                param="lora_name",
            )

    def _check_prompt(self, token_ids: list[int], for_generation: bool = True) -> None:
        if not token_ids:
            raise RequestRejected("the prompt is empty")
        if len(token_ids) > self.max_model_len - for_generation:
            if not for_generation:
                raise RequestRejected(
                    f"the input has {len(token_ids)} tokens; this model takes at most {self.max_model_len}"
                )
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that one token can be generated"
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, and chunked prefill is off"
            )

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        # A sequence larger than the whole pool would preempt itself forever.
        needed = -(-(num_prompt_tokens + max_tokens) // self.block_size)
        if needed > self.num_kv_blocks:
            raise RequestRejected(
                f"prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) need {needed} KV blocks; "
                f"the cache has {self.num_kv_blocks}"
            )

    def _choice_token_ids(self, num_prompt_tokens: int, choices: list[str]) -> list[list[int]]:
        token_ids = [[*self.tokenizer.encode(c, add_special_tokens=False), self.choice_eos] for c in choices]
        longest = num_prompt_tokens + max(map(len, token_ids))
        if longest > self.max_model_len:
            raise RequestRejected(
                f"the prompt and its longest choice with EOS take {longest} tokens; "
                f"this model takes at most {self.max_model_len}"
            )
        self._check_fits(longest, 0)
        return token_ids


def is_greedy_choice(params: SamplingParams) -> bool:
    """A greedy `choice` request: answered by scoring every choice, without decoding."""
    spec = params.structured_outputs
    return params.is_greedy and spec is not None and spec.choice is not None
