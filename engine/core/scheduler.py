"""Scheduler: what runs each step (pure Python).

Every step gets a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, oldest first: a decode takes one token, a prompt being prefilled
in chunks takes what the budget leaves. Waiting sequences are then admitted in (priority,
arrival) order while budget, cap and blocks allow. With `priority_aging_steps` a waiting sequence
gains one priority level per that many steps since it first queued, so that a stream of urgent
requests delays the others by a bounded number of steps instead of forever: its effective
priority at step t is `priority - (t - arrival_step) / aging`, and since every waiting sequence
ages alike, ordering by `priority * aging + arrival_step` is the same order, fixed at add(). When blocks run out, the newest running
sequence is preempted: its blocks are freed and it is recomputed from its tokens later.
With prefix caching, a sequence admitted from the queue first takes the cached blocks of its
longest cached prefix and is then scheduled like a chunk of prefill with existing context;
one whose prefix continues with a block that this very step computes for another sequence
waits for the next step, where it finds that block cached (a burst of prompts sharing an
instruction computes the instruction once, not once per prompt admitted in the first step).
With LoRA adapters, the running batch holds sequences of at most `max_loras` distinct adapters
(the model runner's slots): a waiting sequence of another adapter stays queued, and those
behind it are admitted, until a running adapter's last sequence leaves. Once it has waited
`priority_aging_steps` steps, only base-model sequences are admitted past it, so that the
running adapters drain and its wait is bounded.

After the step, `update_from_output` appends the sampled tokens and decides which sequences
are done (EOS, a stop token, max_tokens, a completed grammar), as vLLM v1's `check_stop`
does: it frees them and returns them. Stop strings need text, so the OutputProcessor finds
those; the engine then `finish`es them here.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)  # scheduled this step, in batch order
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each computes this step
    is_sampling: list[bool] = field(default_factory=list)  # reaches its last token: samples the next
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks this step

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that sample a token this step, in batch order (the sampled tokens' order)."""
        return [seq for seq, samples in zip(self.seqs, self.is_sampling, strict=True) if samples]

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        eos_token_ids: frozenset[int] = frozenset(),
        priority_aging_steps: int = 0,  # steps a waiting sequence takes to gain a priority level; 0: never
        max_loras: int = 0,  # distinct LoRA adapters the running batch may hold; 0: no limit
    ) -> None:
        self.max_loras = max_loras
        self.block_manager = block_manager
        self.priority_aging_steps = priority_aging_steps
        self.num_steps = 0  # schedule() calls so far: the clock that waiting sequences age by
        self.eos_token_ids = eos_token_ids
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by _queue_key
        self.running: list[Sequence] = []  # admission order: the newest is preempted first

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if seq.arrival_step is None:  # a preempted sequence keeps the age it had
            seq.arrival_step = self.num_steps
        bisect.insort(self.waiting, seq, key=self._queue_key)

    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # blocks are short: admitting more would only preempt again
            self._schedule_waiting(out, budget)
        return out

    def schedule_ahead(self, running: SchedulerOutput) -> SchedulerOutput | None:
        """Step N+1 while step N (`running`) is still on the device (async scheduling): the next
        decode of each of N's sequences, whose input is the token N is sampling for it, or None
        where N+1 cannot be known before N's tokens are: where N computes prompt tokens, a
        sequence waits to be admitted, a penalty reads the new token's counts, or the blocks would
        not do without a preemption. A grammar does not stop it: N+1's masks are filled on the
        host once N's tokens are read back, while N+1's forward runs (StepPlan.late_grammar_masks).
        N's sequences that certainly end at N (max_tokens) are left out; those that end by a token (EOS, stop token or stop string) are
        known only once N is read back: their step N+1 token is thrown away, never emitted.
        `update_from_output(running, ...)` must come before `update_from_output(ahead, ...)`."""
        if self.waiting or running.preempted:
            return None
        ahead = SchedulerOutput()
        for seq, num_new, samples in zip(
            running.seqs, running.num_new_tokens, running.is_sampling, strict=True
        ):
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended by the step before N (a step scheduled ahead too): N's token is dropped
            params = seq.params
            if (
                not samples
                or num_new != 1
                or seq.num_output_tokens == 0  # its first token: forks and choices start there
                or seq.status is not SequenceStatus.RUNNING
                or params.repetition_penalty != 1.0
                or params.presence_penalty
                or params.frequency_penalty
            ):
                return None
            if seq.num_output_tokens + 1 < seq.max_tokens:
                ahead.seqs.append(seq)
        # room for N's token (computed by N+1) beside N's input: two tokens past the computed ones
        bm = self.block_manager
        if not ahead.seqs or sum(bm.num_blocks_needed(seq, 2) for seq in ahead.seqs) > bm.num_free_blocks:
            return None
        self.num_steps += 1
        for seq in ahead.seqs:
            bm.allocate(seq, 2)
        ahead.num_new_tokens = [1] * len(ahead.seqs)
        ahead.is_sampling = [True] * len(ahead.seqs)
        return ahead

    def update_from_output(
        self,
        out: SchedulerOutput,
        sampled_token_ids: list[int],
        failures: dict[Sequence, Exception] | None = None,
    ) -> list[Sequence]:
        """Advance what the step computed and append one sampled token per sampling sequence, in
        order; finish the sequences that are done. Returns them (freed, `finish_reason` set).
        A sequence whose own update raises (its grammar, say) is recorded in `failures` (the
        caller fails its request) and the others go on; without `failures` the error propagates."""
        finished = []
        sampled = iter(sampled_token_ids)
        for seq, num_new, samples in zip(out.seqs, out.num_new_tokens, out.is_sampling, strict=True):
            token_id = next(sampled) if samples else None
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or aborted while the step ran
            try:
                if self._update_seq(seq, num_new, token_id):
                    finished.append(seq)
            except Exception as e:
                if failures is None:
                    raise
                failures[seq] = e
        return finished

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put the sequences of a step whose model run failed back in the queue: their blocks are
        freed and they are recomputed from their tokens, as if preempted (nothing of the step was
        applied: update_from_output never ran)."""
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._preempt(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Take a sequence out of the batch for good; its blocks return to the pool."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _update_seq(self, seq: Sequence, num_new: int, token_id: int | None) -> bool:
        """One running sequence's part of update_from_output; True if it finished."""
        seq.num_computed_tokens += num_new
        self.block_manager.cache_full_blocks(seq)
        if token_id is not None:
            seq.append_token(token_id)
        stop = self._check_stop(seq, token_id)
        if stop is None:
            return False
        reason, stop_reason, ended_by_token = stop
        self.finish(seq, reason, stop_reason)
        seq.ended_by_stop_token = ended_by_token
        return True

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        bm, running = self.block_manager, self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            needed = bm.num_blocks_needed(seq, num_new)  # once: a decode needs 0 but every block_size steps
            # NOTE: victims are always taken from the end, never from the already scheduled front.
            while needed > bm.num_free_blocks:
                victim = running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            if needed:
                bm.append_blocks(seq, needed)
            self._append(out, seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        # prefix blocks this step computes: a sequence whose prefix continues with one of them
        # waits a step and finds it cached, rather than computing the same block alongside
        in_flight = set()
        if bm.enable_prefix_caching and self.waiting:
            for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
                in_flight.update(bm.blocks_filled_by(seq, num_new))
        loras = {s.lora_name for s in self.running} - {None}  # the running batch's adapters
        i = 0  # waiting sequences before it wait for a slot of their adapter
        draining = False  # the running adapters admit no more: a new adapter has waited its turn
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if self._lacks_lora_slot(seq, loras):  # it waits; those behind it go on
                draining = draining or self._has_waited_a_turn(seq)
                i += 1
                continue
            if draining and seq.lora_name is not None:
                i += 1
                continue
            num_reused = bm.reuse_cached_prefix(seq)
            if in_flight and bm.next_uncached_block(seq) in in_flight:
                self._unadmit(seq)
                return
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                # Without chunked prefill a prompt runs whole or waits; but a preempted sequence's
                # recompute (prompt + output so far) may outgrow the budget, so it is always chunked.
                if not self.enable_chunked_prefill and seq.num_output_tokens == 0:
                    self._unadmit(seq)
                    return
                num_new = budget
            if not self.block_manager.can_allocate(seq, num_new):
                self._unadmit(seq)
                return
            self.block_manager.count_admission(seq, num_reused)
            if seq.num_cached_tokens is None:  # first admission: what the prefix cache gave its prompt
                seq.num_cached_tokens = num_reused
            self.waiting.pop(i)
            if seq.lora_name is not None:
                loras.add(seq.lora_name)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(out, seq, num_new)
            budget -= num_new
            in_flight.update(bm.blocks_filled_by(seq, num_new))

    def _check_stop(self, seq: Sequence, token_id: int | None) -> tuple[str, int | None, bool] | None:
        """(finish_reason, stop_reason, whether a stop token ended it) if the sequence is done
        after this step, else None. As vLLM: EOS ends it with stop_reason None, a token of
        stop_token_ids with that token as the stop_reason."""
        if token_id is None:
            # a prompt chunk; a prefill-only sequence is done once all of it is computed
            return ("length", None, False) if seq.is_prefill_only and seq.num_uncomputed_tokens == 0 else None
        if seq.grammar is not None and (stop := _advance_grammar(seq, token_id, self.eos_token_ids)):
            return stop
        params = seq.params
        if seq.num_output_tokens < params.min_tokens:
            # min_tokens: no stop before it (the sampler also holds its stop tokens back)
            return ("length", None, False) if seq.num_output_tokens >= seq.max_tokens else None
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop", None, True
        if token_id in params.stop_token_ids:
            return "stop", token_id, True
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None, False
        return None

    def _take(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        self.block_manager.allocate(seq, num_new)
        self._append(out, seq, num_new)

    def _append(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        out.seqs.append(seq)
        out.num_new_tokens.append(num_new)
        reaches_end = seq.num_computed_tokens + num_new == seq.num_tokens
        out.is_sampling.append(reaches_end and not seq.is_prefill_only)

    def _lacks_lora_slot(self, seq: Sequence, loras: set[str]) -> bool:
        """Whether admitting `seq` would put more than max_loras adapters in the running batch."""
        return (
            bool(self.max_loras)
            and seq.lora_name is not None
            and seq.lora_name not in loras
            and len(loras) >= self.max_loras
        )

    def _has_waited_a_turn(self, seq: Sequence) -> bool:
        """A sequence waiting for an adapter slot for priority_aging_steps steps (aging on): from then
        on only base-model sequences join, so the running adapters drain and it gets a slot."""
        aging = self.priority_aging_steps
        return bool(aging) and self.num_steps - seq.arrival_step >= aging

    def _queue_key(self, seq: Sequence) -> tuple[int, int]:
        if self.priority_aging_steps:
            return (seq.priority * self.priority_aging_steps + seq.arrival_step, seq.seq_id)
        return (seq.priority, seq.seq_id)

    def _unadmit(self, seq: Sequence) -> None:
        # A waiting sequence holds no blocks: the cached prefix it just took goes back (evictable,
        # not lost), so that blocks never sit with a sequence that cannot run.
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        # Recompute, not swap: its tokens (prompt and output so far) are prefilled again later.
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.add(seq)


def _advance_grammar(seq: Sequence, token_id: int, eos_token_ids: frozenset[int]):
    """Feed the sampled token to the sequence's grammar; a grammar with nothing left to add ends it."""
    if not seq.grammar.consume_token(token_id):
        # the mask allowed only what the grammar accepts, so this is a bug, not bad input
        log.error("%r: the grammar refused token %d: %s", seq, token_id, seq.grammar.get_error())
        return "abort", None, False
    if seq.grammar.is_stopped():
        # complete: either this was EOS, or nothing but EOS could follow (spare that step)
        return "stop", None, token_id in eos_token_ids
    return None
