"""StepPlan: one step as every rank needs it, built by rank 0 from the scheduler's output.

Plain lists and SamplingParams, no Sequence objects: it is pickled to the worker processes
once per step, so it carries only what the model runner reads.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import torch

from engine.choice_scoring import scoring_rows
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from engine.structured_output import token_bitmask

# choice scoring of one step: (rows of the step's flat hidden states, target tokens, owners,
# number of scoring sequences); see engine.choice_scoring.scoring_rows
ScoringRows = tuple[list[int], list[int], list[int], int]


@dataclass(slots=True)
class StepPlan:
    # one entry per scheduled sequence, in batch order
    token_ids: list[list[int]]  # the tokens computed this step
    starts: list[int]  # tokens already in the KV cache: the position of the first new token
    block_tables: list[list[int]]
    is_sampling: list[bool]  # reaches its last token: samples the next one
    # one entry per sampling sequence, in batch order; empty where the receiving rank does not sample
    sampling_params: list[SamplingParams] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    output_token_ids: list[list[int]] = field(default_factory=list)
    # the sampling rows' grammar masks, computed on rank 0 where the grammar matchers live
    token_bitmask: torch.Tensor | None = None
    scoring: ScoringRows | None = None  # choice scoring sequences in this step, if any

    @classmethod
    def build(cls, out: SchedulerOutput, vocab_size: int) -> StepPlan:
        plan = cls([], [], [], list(out.is_sampling))
        for seq, num_new, samples in zip(out.seqs, out.num_new_tokens, out.is_sampling, strict=True):
            start = seq.num_computed_tokens
            plan.token_ids.append(seq.token_ids[start : start + num_new])
            plan.starts.append(start)
            plan.block_tables.append(list(seq.block_table))
            if samples:
                plan.sampling_params.append(seq.params)
                plan.prompt_token_ids.append(seq.prompt_token_ids)
                plan.output_token_ids.append(seq.output_token_ids)
        grammars = [seq.grammar for seq, samples in zip(out.seqs, out.is_sampling, strict=True) if samples]
        plan.token_bitmask = token_bitmask(grammars, vocab_size)
        if num_scoring := sum(seq.is_scoring for seq in out.seqs):
            plan.scoring = (*scoring_rows(out), num_scoring)
        return plan

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    @property
    def num_sampling(self) -> int:
        return sum(self.is_sampling)

    def without_sampling(self) -> StepPlan:
        """The plan for ranks that do not sample: the sampling rows' history stays behind."""
        return dataclasses.replace(
            self,
            sampling_params=[],
            prompt_token_ids=[],
            output_token_ids=[],
            token_bitmask=None,
            scoring=None,
        )

    def split(self, num_micro_batches: int) -> list[StepPlan]:
        """Contiguous groups of sequences with about equal token counts (pipeline micro-batches).

        Sampling rows stay with the whole plan: the last stage samples once, over the
        micro-batches' logits concatenated in order.
        """
        num_micro_batches = max(1, min(num_micro_batches, self.num_seqs))
        if num_micro_batches == 1:
            return [self.without_sampling()]
        total = sum(len(t) for t in self.token_ids)
        bounds, acc = [0], 0
        for i, tokens in enumerate(self.token_ids[:-1]):
            acc += len(tokens)
            remaining_groups = num_micro_batches - len(bounds)
            if remaining_groups > 0 and acc >= total * len(bounds) / num_micro_batches:
                bounds.append(i + 1)
        bounds.append(self.num_seqs)
        return [
            StepPlan(self.token_ids[a:b], self.starts[a:b], self.block_tables[a:b], self.is_sampling[a:b])
            for a, b in itertools.pairwise(bounds)
        ]
