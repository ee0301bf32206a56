"""BlockManager: the paged KV cache's blocks, their reference counts and the sequences' block tables.

Pure Python: it hands out block ids; the model runner turns block tables into slot numbers.
A block is free when its reference count is 0. Reference counts above 1 come from sharing
(prefix caching); `deallocate` always gives back exactly the references a sequence took.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so the cache holds the sequence's computed tokens plus `num_new_tokens`."""
        num_cached = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-num_cached // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend the sequence's block table to hold `num_new_tokens` more tokens. Check first."""
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(
                f"{seq!r} needs {needed} blocks, {len(self._free)} free: call can_allocate first"
            )
        for _ in range(needed):
            block_id = self._free.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def deallocate(self, seq: Sequence) -> None:
        """Give back the sequence's references; blocks nobody references return to the free list."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free.append(block_id)
        seq.block_table.clear()
