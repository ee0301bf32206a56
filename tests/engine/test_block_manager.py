"""BlockManager: block tables cover the cached tokens, the pool never leaks or double-hands a block."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams


def _make_seq(num_prompt_tokens: int = 1, max_tokens: int = 16) -> Sequence:
    return Sequence("r", list(range(num_prompt_tokens)), SamplingParams(max_tokens=max_tokens), max_tokens)


def _grow(bm: BlockManager, seq: Sequence, num_new_tokens: int) -> None:
    """What the scheduler does: allocate for the new tokens, then the step computes them."""
    bm.allocate(seq, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "num_blocks"), [(1, 1, 1), (4, 4, 1), (5, 4, 2), (9, 2, 5)]
)
def test_allocation_covers_ceil_tokens_over_block_size(
    num_tokens: int, block_size: int, num_blocks: int
) -> None:
    bm = BlockManager(num_blocks=8, block_size=block_size)
    seq = _make_seq(num_tokens)
    bm.allocate(seq, num_tokens)
    assert len(seq.block_table) == num_blocks
    assert bm.num_free_blocks == 8 - num_blocks
    assert len(set(seq.block_table)) == num_blocks


def test_allocation_extends_incrementally_as_tokens_grow() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _make_seq(5)
    _grow(bm, seq, 5)
    first = list(seq.block_table)
    assert len(first) == 2
    _grow(bm, seq, 3)  # 8 tokens: the second block fills up, nothing new
    assert seq.block_table == first
    _grow(bm, seq, 1)  # 9 tokens: one more block, the old ones kept in place
    second = list(seq.block_table)
    assert second[:2] == first and len(second) == 3
    _grow(bm, seq, 8)  # 17 tokens: 5 blocks
    assert seq.block_table[:3] == second and len(seq.block_table) == 5
    assert bm.num_free_blocks == 3


def test_zero_new_tokens_allocates_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = _make_seq(1)
    assert bm.can_allocate(seq, 0)
    bm.allocate(seq, 0)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_can_allocate_is_false_exactly_when_too_few_blocks_are_free() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    holder = _make_seq(4)
    _grow(bm, holder, 4)  # 2 of 3 blocks held
    seq = _make_seq(4)
    assert bm.can_allocate(seq, 1) and bm.can_allocate(seq, 2)
    assert not bm.can_allocate(seq, 3)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(seq, 3)
    assert seq.block_table == [] and bm.num_free_blocks == 1  # a failed allocate takes nothing
    _grow(bm, seq, 2)
    assert bm.num_free_blocks == 0
    assert bm.can_allocate(seq, 0)  # nothing new to hold
    assert not bm.can_allocate(seq, 1)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 1)


def test_deallocate_returns_every_block_and_ref_counts_go_back_to_zero() -> None:
    bm = BlockManager(num_blocks=6, block_size=3)
    a, b = _make_seq(7), _make_seq(5)
    _grow(bm, a, 7)
    _grow(bm, b, 5)
    assert bm.num_free_blocks == 1
    assert sorted(bm.ref_counts) == [0, 1, 1, 1, 1, 1]
    held_by_a = list(a.block_table)
    bm.deallocate(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 4
    assert all(bm.ref_counts[block] == 0 for block in held_by_a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 6 and bm.ref_counts == [0] * 6
    bm.deallocate(b)  # twice is harmless: the table is empty
    assert bm.num_free_blocks == 6 and bm.ref_counts == [0] * 6


def test_freed_blocks_are_handed_out_again() -> None:
    bm = BlockManager(num_blocks=2, block_size=1)
    a = _make_seq(2)
    _grow(bm, a, 2)
    bm.deallocate(a)
    b = _make_seq(2)
    _grow(bm, b, 2)
    assert sorted(b.block_table) == [0, 1] and bm.num_free_blocks == 0


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 1), (1, 0), (-1, 4)])
def test_rejects_an_empty_pool_or_empty_blocks(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=num_blocks, block_size=block_size)


NUM_SEQS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Several sequences grow by random amounts and are freed (finished or preempted) at random."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
        self.seqs = [_make_seq(1) for _ in range(NUM_SEQS)]

    @rule(i=st.integers(0, NUM_SEQS - 1), n=st.integers(0, 9))
    def grow(self, i: int, n: int) -> None:
        seq = self.seqs[i]
        before_table, before_free = list(seq.block_table), self.bm.num_free_blocks
        needed = max(0, -(-(seq.num_computed_tokens + n) // self.bm.block_size) - len(before_table))
        assert self.bm.can_allocate(seq, n) == (needed <= before_free)
        if needed <= before_free:
            _grow(self.bm, seq, n)
            assert seq.block_table[: len(before_table)] == before_table
            assert len(seq.block_table) == -(-seq.num_computed_tokens // self.bm.block_size)
            assert self.bm.num_free_blocks == before_free - needed
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq, n)
            assert seq.block_table == before_table and self.bm.num_free_blocks == before_free

    @precondition(lambda self: any(seq.block_table for seq in self.seqs))
    @rule(data=st.data())
    def deallocate(self, data: st.DataObject) -> None:
        holders = [seq for seq in self.seqs if seq.block_table]
        seq = data.draw(st.sampled_from(holders))
        freed, before_free = len(seq.block_table), self.bm.num_free_blocks
        self.bm.deallocate(seq)
        seq.num_computed_tokens = 0  # like preemption: recomputed from scratch later
        assert seq.block_table == []
        assert self.bm.num_free_blocks == before_free + freed

    @invariant()
    def free_plus_held_is_the_pool(self) -> None:
        held = sum(len(seq.block_table) for seq in self.seqs)
        assert self.bm.num_free_blocks + held == self.bm.num_blocks

    @invariant()
    def ref_count_equals_number_of_tables_holding_the_block(self) -> None:
        holders = [0] * self.bm.num_blocks
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for block in seq.block_table:
                assert 0 <= block < self.bm.num_blocks
                holders[block] += 1
        assert all(count <= 1 for count in holders)  # no sharing without prefix caching
        assert self.bm.ref_counts == holders

    @invariant()
    def free_blocks_have_ref_count_zero_and_are_listed_once(self) -> None:
        free = list(self.bm._free)
        assert len(set(free)) == len(free)
        assert all(0 <= block < self.bm.num_blocks and self.bm.ref_counts[block] == 0 for block in free)
        assert set(free) == {b for b in range(self.bm.num_blocks) if self.bm.ref_counts[b] == 0}


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# Prefix caching: prompts built from a few shared prefixes, so that blocks are found in the cache.
PREFIXES = ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5])


def _cached_seq(prefix: int, suffix: list[int]) -> Sequence:
    tokens = PREFIXES[prefix] + suffix
    return Sequence("r", tokens, SamplingParams(max_tokens=64), 64)


def _compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """One scheduled step: allocate, compute, register what became full (the scheduler's order)."""
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def test_a_second_identical_prompt_reuses_every_full_block_but_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = _cached_seq(0, [10, 11, 12, 13])  # 12 tokens: 3 full blocks
    _compute(bm, first, first.num_tokens)
    second = _cached_seq(0, [10, 11, 12, 13])
    assert bm.reuse_cached_prefix(second) == 8  # not the third block: its last token must be computed
    assert second.block_table == first.block_table[:2]
    assert [bm.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    bm.count_admission(second, 8)
    assert (bm.stats.queried_tokens, bm.stats.hit_tokens) == (12, 8)


def test_prompts_reuse_only_up_to_their_first_differing_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = _cached_seq(0, [10, 11, 12, 13])
    _compute(bm, first, first.num_tokens)
    other = _cached_seq(1, [10, 11, 12, 13])  # same first block, different second one
    assert bm.reuse_cached_prefix(other) == 4
    assert other.block_table == first.block_table[:1]


def test_unreferenced_cached_blocks_stay_until_the_pool_needs_them_then_go_least_recent_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = _cached_seq(0, [])  # 2 full blocks
    _compute(bm, a, 8)
    a_head, a_tail = a.block_table
    bm.deallocate(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2  # cached, not forgotten
    b = _cached_seq(2, [1])  # 9 tokens, nothing cached: takes the 2 never-cached blocks first
    _compute(bm, b, 2 * 4)
    assert set(b.block_table).isdisjoint(bm.evictable) and len(bm.cached) == 4
    _compute(bm, b, 1)  # a third block: the pool is out of never-cached ones, so one is evicted
    # a's tail was released first, so it is evicted first; a's head is still cached
    assert b.block_table[-1] == a_tail and a_head in bm.evictable
    assert bm.reuse_cached_prefix(_cached_seq(0, [1])) == 4


def test_prefix_caching_off_never_shares() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _cached_seq(0, [1])
    _compute(bm, a, a.num_tokens)
    assert bm.reuse_cached_prefix(_cached_seq(0, [1])) == 0 and not bm.cached


class CachingBlockManagerMachine(RuleBasedStateMachine):
    """Sequences sharing prompt prefixes are admitted (taking cached blocks), computed, grown and freed."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), data=st.data())
    def setup(self, num_blocks: int, block_size: int, data: st.DataObject) -> None:
        self.bm = BlockManager(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=True)
        self.seqs = [
            _cached_seq(data.draw(st.integers(0, 2)), data.draw(st.lists(st.integers(0, 3), max_size=4)))
            for _ in range(NUM_SEQS)
        ]

    @rule(i=st.integers(0, NUM_SEQS - 1))
    def admit(self, i: int) -> None:
        seq = self.seqs[i]
        if seq.block_table:
            return
        seq.num_computed_tokens = 0
        reused = self.bm.reuse_cached_prefix(seq)
        assert reused == seq.num_computed_tokens < seq.num_tokens
        assert reused % self.bm.block_size == 0 and len(seq.block_table) * self.bm.block_size == reused

    @rule(i=st.integers(0, NUM_SEQS - 1), n=st.integers(1, 9), new_tokens=st.lists(st.integers(0, 3)))
    def compute(self, i: int, n: int, new_tokens: list[int]) -> None:
        seq = self.seqs[i]
        for token in new_tokens:  # generated since the last step
            seq.append_token(token)
        n = min(n, seq.num_uncomputed_tokens)
        if n and self.bm.can_allocate(seq, n):
            _compute(self.bm, seq, n)

    @precondition(lambda self: any(seq.block_table for seq in self.seqs))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from([seq for seq in self.seqs if seq.block_table]))
        self.bm.deallocate(seq)  # finished, aborted or preempted
        seq.num_computed_tokens = 0

    @rule()
    def release_all(self) -> None:
        for seq in self.seqs:
            self.bm.deallocate(seq)
            seq.num_computed_tokens = 0
        # every block is back: never-cached in the free list, or cached and evictable
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert len(self.bm._free) + len(self.bm.evictable) == self.bm.num_blocks

    @invariant()
    def ref_count_equals_number_of_tables_holding_the_block(self) -> None:
        holders = [0] * self.bm.num_blocks
        for seq in self.seqs:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for block in seq.block_table:
                holders[block] += 1
        assert self.bm.ref_counts == holders

    @invariant()
    def every_block_is_held_free_or_evictable_exactly_once(self) -> None:
        held = {b for seq in self.seqs for b in seq.block_table}
        free, evictable = list(self.bm._free), list(self.bm.evictable)
        assert len(set(free)) == len(free)
        assert sorted([*held, *free, *evictable]) == list(range(self.bm.num_blocks))
        assert all(self.bm.block_hashes[b] is None for b in free)
        assert all(self.bm.block_hashes[b] is not None for b in evictable)

    @invariant()
    def shared_blocks_are_cached_and_hold_the_same_prefix_for_every_holder(self) -> None:
        bm = self.bm
        assert {h: b for b, h in enumerate(bm.block_hashes) if h is not None} == bm.cached
        for seq in self.seqs:
            for position, block in enumerate(seq.block_table):
                if bm.ref_counts[block] > 1:
                    assert bm.block_hashes[block] is not None
                if bm.block_hashes[block] is not None:
                    # the block caches exactly this sequence's prefix up to and including it
                    assert seq.block_hashes[position] == bm.block_hashes[block]


TestCachingBlockManagerMachine = CachingBlockManagerMachine.TestCase
TestCachingBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
