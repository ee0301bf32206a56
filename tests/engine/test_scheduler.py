"""Scheduler: budgets, chunked prefill, admission order, preemption and recompute, on a fake model."""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.sampling_params import SamplingParams

_request_ids = itertools.count()


def _make_seq(num_prompt_tokens: int, max_tokens: int = 16, priority: int = 0) -> Sequence:
    prompt = [(7 * i + 3) % 50 for i in range(num_prompt_tokens)]
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(f"req-{next(_request_ids)}", prompt, params, max_tokens, priority)


def _make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 32,
    chunked: bool = True,
    aging: int = 0,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size), max_num_seqs, budget, chunked, priority_aging_steps=aging
    )


def _next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000


def _constant_model(out: SchedulerOutput) -> list[int]:
    return [7 for samples in out.is_sampling if samples]


def _history_model(out: SchedulerOutput) -> list[int]:
    """Samples from the tokens the step leaves in the cache (what a real model sees), before the update."""
    return [
        _next_token(seq.token_ids[: seq.num_computed_tokens + n])
        for seq, n, samples in zip(out.seqs, out.num_new_tokens, out.is_sampling, strict=True)
        if samples
    ]


def _run_step(scheduler: Scheduler, model=_constant_model) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update_from_output(out, model(out))
    for seq in out.seqs:
        if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= seq.max_tokens:
            scheduler.finish(seq, "length")
    return out


def _check_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    bm = scheduler.block_manager
    assert out.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(out.seqs) <= scheduler.max_num_seqs and len(scheduler.running) <= scheduler.max_num_seqs
    assert len({id(seq) for seq in out.seqs}) == len(out.seqs)
    assert all(n > 0 for n in out.num_new_tokens)
    assert not set(map(id, out.preempted)) & set(map(id, out.seqs))
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in scheduler.running:
        assert seq.num_computed_tokens <= seq.num_tokens
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    held = [block for seq in scheduler.running for block in seq.block_table]
    assert len(set(held)) == len(held) and bm.num_free_blocks + len(held) == bm.num_blocks


def _reference_output(seq: Sequence) -> list[int]:
    tokens = seq.prompt_token_ids
    for _ in range(seq.max_tokens):
        tokens.append(_next_token(tokens))
    return tokens[seq.num_prompt_tokens :]


def test_prompt_within_budget_is_prefilled_in_one_step_then_decodes_one_token_per_step() -> None:
    scheduler = _make_scheduler(budget=32)
    seq = _make_seq(10, max_tokens=3)
    scheduler.add(seq)
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([seq], [10], [True])
    assert seq.num_computed_tokens == 10 and seq.output_token_ids == [7]
    for step in (2, 3):
        out = _run_step(scheduler)
        assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([seq], [1], [True])
        assert seq.num_output_tokens == step
    assert seq.is_finished and seq.finish_reason == "length" and not _has_unfinished(scheduler)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_chunked_prefill_splits_a_long_prompt_into_budget_sized_chunks_and_only_the_last_samples() -> None:
    scheduler = _make_scheduler(budget=8, chunked=True)
    seq = _make_seq(20, max_tokens=2)
    scheduler.add(seq)
    chunks = [_run_step(scheduler) for _ in range(3)]
    assert [out.num_new_tokens for out in chunks] == [[8], [8], [4]]
    assert [out.is_sampling for out in chunks] == [[False], [False], [True]]
    assert seq.num_computed_tokens == 20 and seq.output_token_ids == [7]


def test_chunked_prefill_schedules_running_decodes_before_a_prefill_chunk_in_the_same_step() -> None:
    scheduler = _make_scheduler(budget=8, chunked=True)
    decoding, long = _make_seq(4, max_tokens=10), _make_seq(20, max_tokens=1)
    scheduler.add(decoding)
    _run_step(scheduler)
    scheduler.add(long)
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([decoding, long], [1, 7], [True, False])
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([decoding, long], [1, 7], [True, False])
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([decoding, long], [1, 6], [True, True])


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_left_waits_whole() -> None:
    scheduler = _make_scheduler(budget=10, chunked=False)
    decoding, whole = _make_seq(4, max_tokens=3), _make_seq(10, max_tokens=1)
    short = _make_seq(2, max_tokens=1)
    scheduler.add(decoding)
    _run_step(scheduler)
    scheduler.add(whole)
    scheduler.add(short)
    for _ in range(2):  # the decode leaves 9 of 10 tokens: not enough, and `short` does not jump the queue
        out = _run_step(scheduler)
        assert (out.seqs, out.num_new_tokens) == ([decoding], [1])
        assert whole.num_computed_tokens == 0 and scheduler.waiting == [whole, short]
    assert decoding.is_finished
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([whole], [10], [True])
    out = _run_step(scheduler)
    assert (out.seqs, out.num_new_tokens) == ([short], [2])


def test_token_budget_and_max_num_seqs_are_never_exceeded() -> None:
    for seed, chunked in itertools.product(range(10), (True, False)):
        rng = random.Random(seed)
        scheduler = _make_scheduler(num_blocks=30, block_size=2, max_num_seqs=3, budget=24, chunked=chunked)
        pending = [_make_seq(rng.randint(1, 20), max_tokens=rng.randint(1, 8)) for _ in range(12)]
        steps = 0
        while pending or _has_unfinished(scheduler):
            for _ in range(rng.randint(0, 2)):
                if pending:
                    scheduler.add(pending.pop())
            _check_step(scheduler, _run_step(scheduler))
            steps += 1
            assert steps < 500, "does not terminate"


def test_new_requests_join_between_steps_and_finished_ones_leave() -> None:
    scheduler = _make_scheduler()
    a, b, c = _make_seq(3, max_tokens=2), _make_seq(3, max_tokens=3), _make_seq(3, max_tokens=1)
    scheduler.add(a)
    assert _run_step(scheduler).seqs == [a] and scheduler.running == [a]
    scheduler.add(b)
    assert _run_step(scheduler).seqs == [a, b] and scheduler.running == [b]
    scheduler.add(c)
    assert _run_step(scheduler).seqs == [b, c] and scheduler.running == [b]
    assert _run_step(scheduler).seqs == [b] and scheduler.running == []
    assert [s.num_output_tokens for s in (a, b, c)] == [2, 3, 1] and all(s.is_finished for s in (a, b, c))


def _run_until_b_is_preempted(scheduler: Scheduler) -> tuple[Sequence, Sequence, SchedulerOutput]:
    """Blocks of 2, a pool of 6: two prompts of 4 fill it after 3 steps; at step 4 `a` needs a 4th block."""
    a, b = _make_seq(4, max_tokens=4), _make_seq(4, max_tokens=6)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        out = _run_step(scheduler, _history_model)
        assert out.seqs == [a, b] and not out.preempted
    assert scheduler.block_manager.num_free_blocks == 0
    return a, b, _run_step(scheduler, _history_model)


def test_preempts_newest_running_seq_when_blocks_run_out_and_recomputes_it_later() -> None:
    scheduler = _make_scheduler(num_blocks=6, block_size=2, budget=16)
    a, b, out = _run_until_b_is_preempted(scheduler)
    assert out.preempted == [b] and out.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and scheduler.waiting == [b] and scheduler.running == []  # `a` finished
    assert b.num_output_tokens == 3 and scheduler.block_manager.num_free_blocks == 6
    out = _run_step(scheduler, _history_model)  # recompute: prompt and the 3 tokens already generated
    assert (out.seqs, out.num_new_tokens, out.is_sampling) == ([b], [7], [True])
    while _has_unfinished(scheduler):
        _run_step(scheduler, _history_model)
    assert a.output_token_ids == _reference_output(a) and b.output_token_ids == _reference_output(b)
    assert b.num_output_tokens == 6 and scheduler.block_manager.ref_counts == [0] * 6


def test_preempted_seq_is_readmitted_before_newer_waiting_ones() -> None:
    scheduler = _make_scheduler(num_blocks=6, block_size=2, budget=16)
    _, b, _ = _run_until_b_is_preempted(scheduler)
    newer = _make_seq(6, max_tokens=1)  # 3 blocks: it fits once `b` (7 tokens, 4 blocks) is in, but not both
    scheduler.add(newer)
    out = _run_step(scheduler)
    assert out.seqs == [b] and scheduler.waiting == [newer]


def test_lower_priority_value_is_admitted_before_an_earlier_arriving_higher_value() -> None:
    scheduler = _make_scheduler(max_num_seqs=1)
    later_but_urgent = _make_seq(2, max_tokens=1, priority=0)
    early = _make_seq(2, max_tokens=1, priority=1)
    scheduler.add(early)
    scheduler.add(later_but_urgent)
    assert _run_step(scheduler).seqs == [later_but_urgent]
    assert _run_step(scheduler).seqs == [early]


def test_equal_priorities_are_admitted_first_come_first_served() -> None:
    scheduler = _make_scheduler(max_num_seqs=1)
    seqs = [_make_seq(2, max_tokens=1, priority=3) for _ in range(4)]
    for seq in (seqs[2], seqs[0], seqs[3], seqs[1]):  # the order of add() does not matter, arrival does
        scheduler.add(seq)
    assert [_run_step(scheduler).seqs for _ in range(4)] == [[seq] for seq in seqs]


def test_no_new_sequences_are_admitted_in_a_step_that_preempted() -> None:
    scheduler = _make_scheduler(num_blocks=6, block_size=2, budget=16)
    a, b = _make_seq(4, max_tokens=8), _make_seq(4, max_tokens=6)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        _run_step(scheduler)
    urgent = _make_seq(1, max_tokens=1, priority=-1)  # ahead of `b`, 1 block, and 2 blocks stay free
    scheduler.add(urgent)
    out = _run_step(scheduler)
    assert out.preempted == [b] and out.seqs == [a] and scheduler.block_manager.num_free_blocks == 2
    assert scheduler.waiting == [urgent, b]
    assert _run_step(scheduler).seqs == [a, urgent]  # the next step admits it; `b` (4 blocks) still waits


def test_without_chunked_prefill_a_preempted_seq_that_outgrew_the_budget_is_still_recomputed() -> None:
    """Both prompts (4 tokens) fit the budget of 5, so LLMEngine admits them; `b` is preempted with 6 tokens."""
    scheduler = _make_scheduler(num_blocks=6, block_size=2, budget=5, chunked=False)
    a, b = _make_seq(4, max_tokens=4), _make_seq(4, max_tokens=6)
    scheduler.add(a)
    scheduler.add(b)
    preempted = []
    for _ in range(50):
        if not _has_unfinished(scheduler):
            break
        preempted += _run_step(scheduler, _history_model).preempted
    assert preempted == [b] and a.is_finished
    assert b.is_finished, f"livelock: {b!r} waits for {b.num_tokens} tokens in one step of a budget of 5"
    assert b.output_token_ids == _reference_output(b)


def test_finish_of_a_running_sequence_returns_its_blocks() -> None:
    scheduler = _make_scheduler(num_blocks=8, block_size=2, budget=4)
    prefilling, decoding = _make_seq(10), _make_seq(3)
    scheduler.add(decoding)
    scheduler.add(prefilling)
    _run_step(scheduler)
    _run_step(scheduler)
    assert prefilling.status is SequenceStatus.RUNNING and 0 < prefilling.num_computed_tokens < 10
    scheduler.finish(prefilling, "abort")
    scheduler.finish(decoding, "stop", stop_reason=2)
    assert prefilling.finish_reason == "abort"
    assert (decoding.finish_reason, decoding.stop_reason) == ("stop", 2)
    assert prefilling.block_table == [] and decoding.block_table == [] and scheduler.running == []
    assert scheduler.block_manager.num_free_blocks == 8 and scheduler.block_manager.ref_counts == [0] * 8
    assert _run_step(scheduler).is_empty and not _has_unfinished(scheduler)


def test_abort_of_a_waiting_sequence_takes_it_out_of_the_queue() -> None:
    scheduler = _make_scheduler(num_blocks=6, block_size=2, budget=16)
    _, b, _ = _run_until_b_is_preempted(scheduler)
    scheduler.finish(b, "abort")
    assert b.is_finished and scheduler.waiting == [] and not _has_unfinished(scheduler)
    assert _run_step(scheduler).is_empty and scheduler.block_manager.num_free_blocks == 6


def test_a_sequence_aborted_while_its_step_runs_gets_nothing_and_the_others_get_their_tokens() -> None:
    scheduler = _make_scheduler()
    a, b = _make_seq(3), _make_seq(5)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    scheduler.finish(a, "abort")
    scheduler.update_from_output(out, [11, 22])
    assert a.output_token_ids == [] and a.num_computed_tokens == 0 and a.block_table == []
    assert b.output_token_ids == [22] and b.num_computed_tokens == 5


class _Workload(NamedTuple):
    seqs: list[tuple[int, int, int, int]]  # (prompt length, max_tokens, priority, arrival step)
    block_size: int
    num_blocks: int
    budget: int
    max_num_seqs: int
    chunked: bool
    aborts: list[tuple[int, int]]  # (step, index of the sequence)
    aging: int = 0  # priority_aging_steps


@st.composite
def _workloads(draw: st.DrawFn) -> _Workload:
    block_size, chunked = draw(st.integers(1, 4)), draw(st.booleans())
    seq = st.tuples(st.integers(1, 40), st.integers(1, 10), st.integers(0, 2), st.integers(0, 6))
    seqs = draw(st.lists(seq, min_size=1, max_size=8))
    largest = max(-(-(p + m) // block_size) for p, m, _, _ in seqs)
    total = sum(-(-(p + m) // block_size) for p, m, _, _ in seqs)
    num_blocks = draw(st.integers(largest, largest + 2) | st.integers(largest, max(largest, total)))
    # Without chunked prefill LLMEngine rejects a prompt longer than the budget; the rest must all finish.
    longest = max(p for p, _, _, _ in seqs)
    unchunked_budget = st.integers(longest, longest + 2) | st.integers(longest, max(32, longest))
    budget = draw(st.integers(1, 32) if chunked else unchunked_budget)
    aborts = draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, len(seqs) - 1)), max_size=3))
    aging = draw(st.sampled_from([0, 1, 3]))
    return _Workload(seqs, block_size, num_blocks, budget, draw(st.integers(1, 8)), chunked, aborts, aging)


# Found by hypothesis: without chunked prefill the 27-token prompt is preempted with 30 tokens, over the budget.
_LIVELOCK = _Workload([(1, 4, 0, 1), (1, 5, 0, 0), (27, 4, 0, 1)], 4, 10, 29, 3, False, [])


@settings(max_examples=200, deadline=None)
@given(_workloads())
@example(_LIVELOCK)
def test_every_workload_finishes_with_full_outputs_and_returns_every_block(w: _Workload) -> None:
    scheduler = _make_scheduler(w.num_blocks, w.block_size, w.max_num_seqs, w.budget, w.chunked, w.aging)
    seqs = [_make_seq(p, max_tokens=m, priority=prio) for p, m, prio, _ in w.seqs]
    arrivals = [arrival for *_, arrival in w.seqs]
    # Each step admits into an empty batch or advances the oldest running sequence, which is never preempted.
    max_steps = max(arrivals) + sum(p + m for p, m, _, _ in w.seqs) + 2
    aborted: set[int] = set()
    step = 0
    while step <= max(arrivals) or _has_unfinished(scheduler):
        assert step < max_steps, f"livelock: {scheduler.waiting=} {scheduler.running=}"
        for seq, arrival in zip(seqs, arrivals, strict=True):
            if arrival == step:
                scheduler.add(seq)
        for abort_step, i in w.aborts:
            if abort_step == step and arrivals[i] <= step and not seqs[i].is_finished:
                scheduler.finish(seqs[i], "abort")
                aborted.add(i)
        _check_step(scheduler, _run_step(scheduler, _history_model))
        step += 1
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.ref_counts == [0] * bm.num_blocks
    for i, seq in enumerate(seqs):
        assert seq.is_finished and seq.block_table == []
        expected = _reference_output(seq)  # whatever the pool, preempted and recomputed or not
        if i in aborted:
            assert seq.finish_reason == "abort" and seq.output_token_ids == expected[: seq.num_output_tokens]
        else:
            assert seq.finish_reason == "length" and seq.output_token_ids == expected


def _has_unfinished(scheduler: Scheduler) -> bool:
    return bool(scheduler.waiting or scheduler.running)
