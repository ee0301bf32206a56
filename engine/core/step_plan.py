"""StepPlan: one step as every rank needs it, built by rank 0 from the scheduler's output.

Plain lists and SamplingParams, no Sequence objects: it is pickled to the worker processes
once per step, so it carries only what the model runner reads.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field

from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.structured_output import GrammarMasks, LateGrammarMasks, grammar_masks
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class PromptLogprobRows:
    """The prompt logprobs one step computes: for each, the row of the step's flat hidden states
    that predicts it, the token it scores, and (rank 0 only) the sequence and position it belongs to.

    The hidden state at position p predicts token p + 1; a sequence with `prompt_logprobs_from`
    wants the log-probability of every token from there on that this step's chunk predicts.
    """

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, token position)
    num_top: int = 0  # alternatives per row: the most a row's request asked for (a greedy choice's logprobs)

    @classmethod
    def of(cls, out: SchedulerOutput) -> PromptLogprobRows | None:
        rows = cls()
        offset = 0
        for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
            if seq.prompt_logprobs_from is not None:
                rows.num_top = max(rows.num_top, seq.params.logprobs or 0)
                start = seq.num_computed_tokens
                for position in range(max(start, seq.prompt_logprobs_from - 1), start + num_new):
                    if position + 1 < seq.num_tokens:
                        rows.rows.append(offset + position - start)
                        rows.targets.append(seq.token_ids[position + 1])
                        rows.owners.append((seq, position + 1))
            offset += num_new
        return rows if rows.rows else None


@dataclass(slots=True)
class PoolingRows:
    """The rows of a step's flat hidden states that pooling sequences need, with their owners."""

    rows: list[int] = field(default_factory=list)
    owners: list[Sequence] = field(default_factory=list)
    restarts: list[Sequence] = field(default_factory=list)  # mean pooling computing from position 0

    @classmethod
    def of(cls, out: SchedulerOutput) -> PoolingRows | None:
        rows = cls()
        offset = 0
        for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            if seq.pooling == "mean":
                if start == 0:
                    rows.restarts.append(seq)
                rows.rows += range(offset, offset + num_new)
                rows.owners += [seq] * num_new
            elif seq.pooling == "last" and start + num_new == seq.num_tokens:
                rows.rows.append(offset + num_new - 1)
                rows.owners.append(seq)
            offset += num_new
        return rows if rows.rows else None


@dataclass(slots=True)
class BlockTableUpdate:
    """What a sequence's block table gained since the runners last saw it: `blocks` go at
    `offset` (0: the table is new or was given back and rebuilt: the runner's copy starts over)."""

    seq_id: int
    offset: int
    blocks: list[int]


@dataclass(slots=True)
class StepPlan:
    # one entry per scheduled sequence, in batch order
    seq_ids: list[int]  # the rows of the runners' persistent batch (engine/executor/persistent_batch.py)
    token_ids: list[list[int]]  # the tokens computed this step
    starts: list[int]  # tokens already in the KV cache: the position of the first new token
    is_sampling: list[bool]  # reaches its last token: samples the next one
    # the persistent batch's changes, applied before the step runs (releases first): block ids the
    # scheduled sequences gained, and the sequences whose tables were given back
    block_table_updates: list[BlockTableUpdate] = field(default_factory=list)
    released_seq_ids: list[int] = field(default_factory=list)
    # one entry per sampling sequence, in batch order; empty where the receiving rank does not sample
    sampling_params: list[SamplingParams] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)  # tokens generated so far
    # token histories, only of rows whose penalties read them (() for the others: no copies)
    prompt_token_ids: list[Sequence_[int]] = field(default_factory=list)
    output_token_ids: list[Sequence_[int]] = field(default_factory=list)
    # the sampling rows' grammar masks, computed on rank 0 where the grammar matchers live
    grammar_masks: GrammarMasks | None = None
    # async scheduling: the masks of a step planned before the grammars saw the tokens of the step
    # still running; the host fills them while this step's forward runs (in one process only)
    late_grammar_masks: LateGrammarMasks | None = None
    # prompt logprobs this step computes: (rows of the step's flat hidden states, target tokens)
    prompt_logprob_rows: tuple[list[int], list[int]] | None = None
    prompt_logprob_top: int = 0  # alternatives per prompt logprob row (PromptLogprobRows.num_top)
    # rows of the step's flat final hidden states that pooling requests need (engine/core/pooling.py)
    pooling_rows: list[int] | None = None
    # async scheduling: each row's input is the previous step's sampled token of this row of it
    # (StepPlan.build's ahead_of); None: the inputs are token_ids
    input_rows_from_previous: list[int] | None = None
    # one entry per scheduled sequence: its LoRA adapter's name, None for the base model (empty: none has one)
    lora_names: list[str | None] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        out: SchedulerOutput,
        vocab_size: int,
        prompt_logprobs: PromptLogprobRows | None = None,
        pooling: PoolingRows | None = None,
        released_seq_ids: list[int] | None = None,
        ahead_of: SchedulerOutput | None = None,
    ) -> StepPlan:
        """The plan of a scheduled step. `released_seq_ids`: BlockManager.take_released(), the
        sequences whose tables the runners drop; every plan a runner executes must carry them.
        `ahead_of`: the step still running that `out` was scheduled ahead of (Scheduler.schedule_ahead):
        each sequence is a token further on than the host knows, and its input is that step's
        sampled token for it, which the runner takes on the device (`input_rows_from_previous`)."""
        plan = cls([], [], [], list(out.is_sampling), released_seq_ids=released_seq_ids or [])
        previous = None
        if ahead_of is not None:
            previous = {seq.seq_id: row for row, seq in enumerate(ahead_of.sampling_seqs)}
            plan.input_rows_from_previous = []
        for seq, num_new, samples in zip(out.seqs, out.num_new_tokens, out.is_sampling, strict=True):
            start = seq.num_computed_tokens
            plan.seq_ids.append(seq.seq_id)
            if previous is None:
                plan.token_ids.append(seq.token_ids[start : start + num_new])
            else:
                start += 1  # the token the running step computes
                plan.token_ids.append([0])  # its sampled token, filled in on the device
                plan.input_rows_from_previous.append(previous[seq.seq_id])
            plan.starts.append(start)
            synced, table = seq.num_synced_blocks, seq.block_table
            if synced != len(table):  # a decode step adds a block once every block_size tokens
                plan.block_table_updates.append(BlockTableUpdate(seq.seq_id, synced, table[synced:]))
                seq.num_synced_blocks = len(table)
            if samples:
                params = seq.params
                plan.sampling_params.append(params)
                plan.output_lens.append(seq.num_output_tokens + (previous is not None))
                if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
                    plan.prompt_token_ids.append(seq.prompt_token_ids)
                    plan.output_token_ids.append(seq.output_token_ids)
                else:
                    plan.prompt_token_ids.append(())
                    plan.output_token_ids.append(())
        if any(seq.lora_name is not None for seq in out.seqs):
            plan.lora_names = [seq.lora_name for seq in out.seqs]
        grammars = [seq.grammar for seq, samples in zip(out.seqs, out.is_sampling, strict=True) if samples]
        if previous is None:
            plan.grammar_masks = grammar_masks(grammars, vocab_size)
        elif any(grammar is not None for grammar in grammars):
            plan.late_grammar_masks = LateGrammarMasks(out.sampling_seqs, vocab_size)
        if prompt_logprobs is not None:
            plan.prompt_logprob_rows = (prompt_logprobs.rows, prompt_logprobs.targets)
            plan.prompt_logprob_top = prompt_logprobs.num_top
        if pooling is not None:
            plan.pooling_rows = pooling.rows
        return plan

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    def without_sampling(self) -> StepPlan:
        """The plan for ranks that do not sample: the sampling rows' history stays behind."""
        return dataclasses.replace(
            self,
            sampling_params=[],
            output_lens=[],
            prompt_token_ids=[],
            output_token_ids=[],
            grammar_masks=None,
            late_grammar_masks=None,
            prompt_logprob_rows=None,
            pooling_rows=None,
        )

    def split(self, num_micro_batches: int) -> list[StepPlan]:
        """Contiguous groups of sequences with about equal token counts (pipeline micro-batches).

        Sampling rows stay with the whole plan: the last stage samples once, over the
        micro-batches' logits concatenated in order. The persistent batch's changes stay with it
        too: the runner applies them once, before the first micro-batch.
        """
        num_micro_batches = max(1, min(num_micro_batches, self.num_seqs))
        if num_micro_batches == 1:
            return [dataclasses.replace(self.without_sampling(), block_table_updates=[], released_seq_ids=[])]
        total = sum(len(t) for t in self.token_ids)
        bounds, acc = [0], 0
        for i, tokens in enumerate(self.token_ids[:-1]):
            acc += len(tokens)
            remaining_groups = num_micro_batches - len(bounds)
            if remaining_groups > 0 and acc >= total * len(bounds) / num_micro_batches:
                bounds.append(i + 1)
        bounds.append(self.num_seqs)
        return [
            StepPlan(
                self.seq_ids[a:b],
                self.token_ids[a:b],
                self.starts[a:b],
                self.is_sampling[a:b],
                lora_names=self.lora_names[a:b],
            )
            for a, b in itertools.pairwise(bounds)
        ]
