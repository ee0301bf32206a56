"""BlockManager: the paged KV cache's blocks, their reference counts and the sequences' block tables.

Pure Python: it hands out block ids; the model runner turns block tables into slot numbers.
A block is free when its reference count is 0. Reference counts above 1 come from sharing
(prefix caching); `deallocate` always gives back exactly the references a sequence took.

Automatic prefix caching: once a block is full of computed tokens it is registered under the
hash of (its parent block's hash, its token ids), so the hash names the whole prefix up to
and including that block (the first block's parent is the sequence's LoRA adapter name, so a
prefix cached under one adapter never serves another). A new sequence takes a reference to every cached block of its
longest cached prefix and computes only the rest. A cached block nobody references stays
in the pool, evictable: it is handed out again (and forgotten) only when no never-cached
block is free, least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from engine.core.sequence import Sequence


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache at admission, and how many were found."""

    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced and holding no cached prefix
        self.block_hashes: list[bytes | None] = [None] * num_blocks  # the prefix a block caches
        self.cached: dict[bytes, int] = {}  # prefix hash -> the block holding it
        # unreferenced cached blocks, least recently released first (the next to be evicted)
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()
        # sequences whose table was given back since the last take_released(): the model runners
        # drop their copies (the next StepPlan says so)
        self._released: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached free ones plus evictable cached ones."""
        return len(self._free) + len(self.evictable)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the cache holds the sequence's computed tokens plus `num_new_tokens`."""
        num_cached = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-num_cached // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend the sequence's block table to hold `num_new_tokens` more tokens. Check first."""
        self.append_blocks(seq, self.num_blocks_needed(seq, num_new_tokens))

    def append_blocks(self, seq: Sequence, count: int) -> None:
        """Add `count` fresh blocks to the sequence's table (allocate's work, for a caller that has
        counted them already)."""
        if count > self.num_free_blocks:
            raise RuntimeError(
                f"{seq!r} needs {count} blocks, {self.num_free_blocks} free: call can_allocate first"
            )
        for _ in range(count):
            block_id = self._take_free_block()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def deallocate(self, seq: Sequence) -> None:
        """Give back the sequence's references; blocks nobody references return to the pool.

        Released last block first, so that a sequence's tail (the part fewest others share)
        is evicted before its head.
        """
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is not None:
                    self.evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table.clear()
        seq.num_synced_blocks = seq.num_registered_blocks = 0
        self._released.append(seq.seq_id)

    def take_released(self) -> list[int]:
        """The ids of the sequences whose block table was given back since the last call."""
        released, self._released = self._released, []
        return released

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Take references to the cached blocks of the sequence's longest cached prefix.

        Only for a sequence that holds no blocks yet. Its computed tokens become that prefix;
        the last token is never taken from the cache, since the step that computes it gives
        the logits to sample from (nor any other position whose logits it needs: see
        Sequence.first_logits_position). Returns the number of tokens reused. Admission statistics
        are counted by `count_admission`, once the sequence is actually admitted.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        usable_blocks = seq.first_logits_position // self.block_size
        hashes = self._prefix_hashes(seq, usable_blocks)
        for block_hash in hashes:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_registered_blocks = len(seq.block_table)  # they are the cache's already
        return seq.num_computed_tokens

    def blocks_filled_by(self, seq: Sequence, num_new_tokens: int) -> list[bytes]:
        """Prefix hashes of the blocks that computing `num_new_tokens` more tokens fills up."""
        if not self.enable_prefix_caching:
            return []
        first = seq.num_computed_tokens // self.block_size
        last = (seq.num_computed_tokens + num_new_tokens) // self.block_size
        return self._prefix_hashes(seq, last)[first:] if last > first else []

    def next_uncached_block(self, seq: Sequence) -> bytes | None:
        """After `reuse_cached_prefix`: the hash of the first reusable block it did not find, if any."""
        if not self.enable_prefix_caching:
            return None
        i = len(seq.block_table)
        if i >= seq.first_logits_position // self.block_size:
            return None
        return self._prefix_hashes(seq, i + 1)[i]

    def count_admission(self, seq: Sequence, num_reused_tokens: int) -> None:
        # requests' prompts only: a forked sequence repeats its request's prompt
        if self.enable_prefix_caching and seq.parent is None:
            self.stats.queried_tokens += seq.num_tokens
            self.stats.hit_tokens += num_reused_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full of computed tokens.

        A prefix another block already caches (two sequences computed it in the same step)
        is left to that block; this one stays uncached and is freed normally. Only the blocks
        filled since the last call are looked at: a decode step costs nothing here until its
        block fills (every block of the table each step was the update phase's largest cost).
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        first = seq.num_registered_blocks
        if num_full <= first:
            return
        hashes = self._prefix_hashes(seq, num_full)
        for i in range(first, num_full):
            block_id, block_hash = seq.block_table[i], hashes[i]
            if self.block_hashes[block_id] is None and block_hash not in self.cached:
                self.block_hashes[block_id] = block_hash
                self.cached[block_hash] = block_id
        seq.num_registered_blocks = num_full

    def _take_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self.evictable.popitem(last=False)  # least recently released
        del self.cached[self.block_hashes[block_id]]
        self.block_hashes[block_id] = None
        return block_id

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first `num_blocks` full blocks, memoised on the sequence.

        A sequence's tokens are only ever appended, so a full block's hash never changes.
        SHA-256 rather than Python's hash(): a 64-bit collision would silently hand one
        prompt another's keys and values.
        """
        hashes = seq.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            # the first block's hash starts from the adapter's name: one adapter's keys and values
            # never serve another's (or the base model's) prompt
            digest = hashlib.sha256(hashes[-1] if hashes else _lora_seed(seq.lora_name))
            digest.update(array("q", seq.token_ids[i * size : (i + 1) * size]).tobytes())
            hashes.append(digest.digest())
        return hashes[:num_blocks]


def _lora_seed(lora_name: str | None) -> bytes:
    return b"" if lora_name is None else b"lora:" + lora_name.encode()
