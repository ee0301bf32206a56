"""Sequence: the engine's own state for one request (pure Python, no torch).

A sequence's tokens are its prompt followed by what it generated. `num_computed_tokens` of
them have their keys and values in the KV cache; the rest are computed by coming steps, a
chunk at a time for a long prompt, one at a time while decoding.
"""

from __future__ import annotations

import enum
import itertools
import time

from engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the running batch: new, or preempted and to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        priority: int = 0,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens clipped to the model's length limit; 0: prefill only
        self.priority = priority  # lower runs first; FCFS among equals
        self.arrival_time = time.time()
        self.arrival_step: int | None = None  # the scheduler step it first queued at (priority aging)
        self.first_token_time: float | None = None
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prompt tokens the prefix cache gave at first admission
        self.block_table: list[int] = []
        # Leading entries of block_table the model runners hold (engine/executor/persistent_batch.py):
        # a step's plan sends only the rest. A table only grows until it is given back whole.
        self.num_synced_blocks = 0
        self.block_hashes: list[bytes] = []  # prefix-cache hashes of its full blocks, memoised
        self.num_registered_blocks = 0  # leading blocks cache_full_blocks has already looked at
        self.grammar = None  # llguidance matcher of a structured output: what may come next
        # Prompt logprobs: the step that computes a position p >= prompt_logprobs_from - 1 also
        # gives the log-probability of token p + 1 (choice scoring uses it; see ChoiceScorer).
        self.prompt_logprobs_from: int | None = None
        # The request's own sequence this one was forked from (a choice's scoring sequence);
        # None for a request's own sequence.
        self.parent: Sequence | None = None
        self.pooling: str | None = (
            None  # a pooling (embedding) request's: "last" | "mean" (engine/core/pooling.py)
        )
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.ended_by_stop_token = False  # EOS or a stop_token_ids token: kept out of the text

    def __repr__(self) -> str:
        return f"Sequence({self.request_id!r}, {self.status.value}, {self.num_computed_tokens}/{self.num_tokens})"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def lora_name(self) -> str | None:
        """The LoRA adapter it runs with (its params'); None: the base model."""
        return self.params.lora_name

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill_only(self) -> bool:
        """Computes its tokens and samples none (max_tokens 0): it exists for its prompt logprobs."""
        return self.max_tokens == 0

    @property
    def gives_output(self) -> bool:
        """Whether the request sees this sequence's output: its own sequence and its parallel
        samples do; a choice's scoring sequences (forks that sample nothing) do not."""
        return self.parent is None or not self.is_prefill_only

    @property
    def first_logits_position(self) -> int:
        """The first position whose logits this sequence needs: it is computed, never taken from the prefix cache."""
        if self.prompt_logprobs_from is not None:
            return self.prompt_logprobs_from - 1
        if self.pooling == "mean":  # every position's hidden state
            return 0
        return self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.token_ids.append(token_id)
