"""PersistentBatch: the runner's block tables follow the scheduler's from plan to plan, and a step's
inputs derived from them equal those built from the sequences' own lists.

A random walk of a scheduler with a small block pool (admissions, chunked prefill, prefix hits,
preemption and recompute, finishes and aborts), each step's plan applied to one PersistentBatch
as a model runner would.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step_plan import BlockTableUpdate, StepPlan
from engine.executor.persistent_batch import PersistentBatch
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _inputs_from_lists(out, block_size: int) -> dict[str, list[int]]:
    """What the step's inputs must be, straight from each sequence's own block table and tokens."""
    positions, slots, token_ids = [], [], []
    for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        for position in range(start, start + num_new):
            positions.append(position)
            slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
            token_ids.append(seq.token_ids[position])
    return {"positions": positions, "slot_mapping": slots, "token_ids": token_ids}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_the_runner_tables_and_inputs_follow_the_scheduler_through_preemption_and_finishes(
    seed: int, prefix_caching: bool
) -> None:
    rng = random.Random(seed)
    block_manager = BlockManager(12, BLOCK_SIZE, prefix_caching)
    scheduler = Scheduler(block_manager, 6, 24, True)
    batch = PersistentBatch(BLOCK_SIZE, num_rows=2, num_columns=2)  # small: rows and columns grow
    shared = [rng.randrange(50) for _ in range(9)]
    live: list[Sequence] = []
    preempted = 0
    for step in range(150):
        if step < 100 and rng.random() < 0.5:
            prompt = (shared if rng.random() < 0.5 else []) + [
                rng.randrange(50) for _ in range(rng.randint(1, 14))
            ]
            max_tokens = rng.randint(1, 20)
            seq = Sequence(f"r{step}", prompt, SamplingParams(max_tokens=max_tokens), max_tokens)
            scheduler.add(seq)
            live.append(seq)
        if live and rng.random() < 0.05:  # an abort between steps
            scheduler.finish(live.pop(rng.randrange(len(live))), "abort")
        out = scheduler.schedule()
        preempted += len(out.preempted)
        if out.is_empty:
            continue
        plan = StepPlan.build(out, 50, released_seq_ids=block_manager.take_released())
        batch.apply(plan)
        for seq in out.seqs:
            assert batch.block_table(seq.seq_id) == seq.block_table
        inputs = batch.inputs(plan)
        expected = _inputs_from_lists(out, BLOCK_SIZE)
        assert inputs.positions.tolist() == expected["positions"]
        assert inputs.slot_mapping.tolist() == expected["slot_mapping"]
        assert inputs.token_ids.tolist() == expected["token_ids"]
        assert inputs.context_lens.tolist() == [
            s + n for s, n in zip(plan.starts, map(len, plan.token_ids), strict=True)
        ]
        assert inputs.is_decode_only == all(n == 1 for n in out.num_new_tokens)
        finished = scheduler.update_from_output(out, [rng.randrange(50) for _ in out.sampling_seqs])
        live = [seq for seq in live if seq not in finished]
        # every row the batch holds belongs to a sequence that holds blocks: given-back tables are
        # dropped by the next plan, so the batch never holds more than the running sequences
        held = {seq.seq_id for seq in scheduler.running}
        assert set(batch.rows) - held <= set(block_manager._released)
    assert preempted > 0, "the walk should preempt (the pool is small)"


def test_a_released_sequence_scheduled_again_in_the_same_plan_starts_over_in_a_fresh_row() -> None:
    batch = PersistentBatch(BLOCK_SIZE)
    batch.apply(StepPlan([], [], [], [], block_table_updates=[BlockTableUpdate(7, 0, [3, 4, 5])]))
    plan = StepPlan([7], [[1]], [0], [True], [BlockTableUpdate(7, 0, [9])], released_seq_ids=[7])
    batch.apply(plan)
    assert batch.block_table(7) == [9]
    assert batch.num_sequences == 1


def test_a_decode_step_sends_only_the_blocks_a_sequence_gained() -> None:
    block_manager = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(block_manager, 4, 64, True)
    seq = Sequence("r", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=8), 8)
    scheduler.add(seq)
    sent = []
    for _ in range(6):
        out = scheduler.schedule()
        plan = StepPlan.build(out, 50, released_seq_ids=block_manager.take_released())
        sent.append([(u.offset, len(u.blocks)) for u in plan.block_table_updates])
        scheduler.update_from_output(out, [7])
    # the prompt's 2 blocks once; then a block when position 8 (the third block) is reached; no
    # other step sends anything
    assert sent == [[(0, 2)], [], [], [(2, 1)], [], []]
    assert seq.status is SequenceStatus.RUNNING


def test_inputs_of_a_mixed_step_lay_the_sequences_end_to_end() -> None:
    batch = PersistentBatch(BLOCK_SIZE)
    updates = [BlockTableUpdate(1, 0, [5, 6]), BlockTableUpdate(2, 0, [8])]
    plan = StepPlan([1, 2], [[11, 12, 13], [21]], [4, 2], [True, True], updates)
    batch.apply(plan)
    inputs = batch.inputs(plan)
    assert inputs.token_ids.tolist() == [11, 12, 13, 21]
    assert inputs.positions.tolist() == [4, 5, 6, 2]
    assert inputs.slot_mapping.tolist() == [6 * 4 + 0, 6 * 4 + 1, 6 * 4 + 2, 8 * 4 + 2]
    assert inputs.cu_query_lens.tolist() == [0, 3, 4]
    assert inputs.cu_context_lens.tolist() == [0, 7, 10]
    assert np.array_equal(inputs.block_tables, [[5, 6], [8, 0]])  # padded with 0 to the step's widest
    assert not inputs.is_decode_only
