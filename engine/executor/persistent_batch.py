"""PersistentBatch: the running sequences' block tables, kept on the runner from step to step.

A decode step changes little: every sequence gains one token, and one in `block_size` of them
a block. Rebuilding the block tables from Python lists every step (a list per sequence, padded,
then a tensor) cost more than any kernel of a small model's step. Here each sequence owns a row
of a block-table array that a step's plan updates by what changed (`BlockTableUpdate`: the
blocks gained, at their offset; the sequences given back), as vLLM v1's persistent batch does.
A step's inputs (positions, slot mapping, its rows of the tables, the query and context prefix
sums) are then array operations over the scheduled rows, with no per-sequence Python but the
row lookup.

Host arrays (numpy, whose calls cost about a microsecond where a small torch op costs several);
the runner copies the step's results to the device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.step_plan import StepPlan


@dataclass(slots=True)
class StepInputs:
    """One step's inputs on the host, in the plan's batch order (T tokens of B sequences)."""

    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: block * block_size + offset of each new token
    query_lens: np.ndarray  # [B] int64
    context_lens: np.ndarray  # [B] int32: tokens in the cache after this step
    cu_query_lens: np.ndarray  # [B + 1] int32
    cu_context_lens: np.ndarray  # [B + 1] int32
    block_tables: np.ndarray  # [B, max blocks of this step's sequences] int32, padded with 0
    is_decode_only: bool


class PersistentBatch:
    """A row of block ids per sequence the scheduler has sent, until the sequence gives it back."""

    def __init__(self, block_size: int, num_rows: int = 64, num_columns: int = 64) -> None:
        self.block_size = block_size
        self.block_tables = np.zeros((num_rows, num_columns), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)  # valid entries of each row
        self.rows: dict[int, int] = {}  # seq_id -> row
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: row 0 first

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    def apply(self, plan: StepPlan) -> None:
        """The plan's changes: its released sequences' rows free first (a sequence given back and
        scheduled again in one plan starts over in a new row), then the blocks it gained."""
        for seq_id in plan.released_seq_ids:
            row = self.rows.pop(seq_id, None)  # one this runner never saw: nothing to drop
            if row is not None:
                self._free_rows.append(row)
        for update in plan.block_table_updates:
            row = self.rows.get(update.seq_id)
            if row is None:
                row = self.rows[update.seq_id] = self._take_row()
            end = update.offset + len(update.blocks)
            if end > self.block_tables.shape[1]:
                self._grow(columns=max(end, 2 * self.block_tables.shape[1]))
            self.block_tables[row, update.offset : end] = update.blocks
            self.num_blocks[row] = end

    def block_table(self, seq_id: int) -> list[int]:
        """A sequence's block ids as the runner holds them (for tests and checks)."""
        row = self.rows[seq_id]
        return self.block_tables[row, : self.num_blocks[row]].tolist()

    def inputs(self, plan: StepPlan) -> StepInputs:
        """The step's inputs for the plan's sequences, whose rows `apply` has brought up to date."""
        size = self.block_size
        rows = np.fromiter(map(self.rows.__getitem__, plan.seq_ids), np.int64, len(plan.seq_ids))
        query_lens = np.fromiter(map(len, plan.token_ids), np.int64, len(plan.token_ids))
        starts = np.array(plan.starts, dtype=np.int64)
        context_lens = starts + query_lens
        cu_query = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=cu_query[1:])
        cu_context = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(context_lens, out=cu_context[1:])
        num_tokens = int(cu_query[-1])
        is_decode_only = num_tokens == len(rows)
        if is_decode_only:  # the common step: one token each, at the end of its context
            token_ids = np.fromiter((tokens[0] for tokens in plan.token_ids), np.int64, num_tokens)
            seq_index, positions = np.arange(len(rows)), starts
        else:
            token_ids = np.fromiter((t for tokens in plan.token_ids for t in tokens), np.int64, num_tokens)
            seq_index = np.repeat(np.arange(len(rows)), query_lens)
            positions = np.arange(num_tokens) - cu_query[:-1][seq_index] + starts[seq_index]
        width = -(-int(context_lens.max()) // size)
        tables = self.block_tables[rows, :width]  # a copy: later updates never reach this step
        slots = tables[seq_index, positions // size].astype(np.int64) * size + positions % size
        return StepInputs(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slots,
            query_lens=query_lens,
            context_lens=context_lens.astype(np.int32),
            cu_query_lens=cu_query,
            cu_context_lens=cu_context,
            block_tables=tables,
            is_decode_only=is_decode_only,
        )

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self.block_tables.shape[0]
            self._grow(rows=2 * old)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int | None = None, columns: int | None = None) -> None:
        old_rows, old_columns = self.block_tables.shape
        tables = np.zeros((rows or old_rows, columns or old_columns), dtype=np.int32)
        tables[:old_rows, :old_columns] = self.block_tables
        self.block_tables = tables
        if rows:
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros(rows - old_rows, dtype=np.int64)])
