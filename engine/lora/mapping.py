"""A step's LoRA plan: how its adapter tokens meet the slot weights, chosen once per step.

The step's adapter tokens fall into runs of consecutive tokens of one adapter (a prefill chunk
is one run, a decode token another). Two shapes apply them, each a few matmuls per layer
whatever the number of requests (the SGMV/BGMV idea), and a step may use both:

- `LoRARuns`: long runs (MIN_RUN_TOKENS and more). Per run and layer one shrink,
  `x[run] @ A^T`, and one expand per fused projection added straight into its rows and columns
  of the output (`addmm_`): nothing is gathered, scattered or padded.
- `LoRAPadded`: many short runs (decodes interleaving adapters): their tokens gathered into one
  batch per slot, padded to the longest, `[slots, P, in]`; one batched shrink and one batched
  expand per fused projection for all adapters, then each token's row picked back and added
  (`index_add_` where other tokens are among the step's). Short runs that are no more than the
  slots they use, or would be padded to more than MAX_PADDING rows per token, run as runs.

On CUDA (where triton imports) neither: `LoRASegments` groups the adapter tokens by slot, one
segment per slot, and two Triton kernels (engine.kernels.triton_lora) apply them all per layer,
one shrink for the S fused projections and one expand adding into each projection's rows.

Slot weights (engine.lora.slots._LayerSlots): A `[max_loras, S * max_rank, in]`, the S fused
projections' A's stacked; B per projection `[max_loras, rows, max_rank]`, the adapter's scaling
folded in (views of one B stacked by row, which the Triton expand reads). Ranks below max_rank
are zero columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.lora.slots import _LayerSlots

MAX_PADDING = 2.0  # a padded batch may hold at most this many rows per adapter token
MIN_RUN_TOKENS = 16  # a run this long applies in place; shorter ones (decodes) may be padded


@dataclass(slots=True)
class LoRARuns:
    """Runs of consecutive tokens of one adapter; tokens outside them (the base model's) get nothing."""

    runs: list[tuple[int, int, int]]  # (slot, first token row, end row)

    def apply(self, layer: _LayerSlots, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> output: [T, out], changed in place
        r = layer.max_rank
        for slot, start, end in self.runs:
            h = x[start:end] @ layer.a[slot].T  # shrink: [t, S r]
            for i, (offset, rows) in enumerate(layer.shards):
                part = output[start:end, offset : offset + rows]  # expand: [t, rows]
                part.addmm_(h[:, i * r : (i + 1) * r], layer.b[i][slot].T)
        return output


@dataclass(slots=True)
class LoRAPadded:
    """The adapter tokens as one padded batch per slot, slots `first` .. `first + num_slots - 1`."""

    first: int
    num_slots: int
    gather: torch.Tensor  # [num_slots * P] int64: x's row for each place of the batch (padding: row 0)
    picks: torch.Tensor  # [t] int64: each adapter token's place in the batch, in token order
    rows: torch.Tensor | None  # [t] int64: those tokens' rows in the step; None: every row, in order

    def apply(self, layer: _LayerSlots, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> output: [T, out]
        slots = slice(self.first, self.first + self.num_slots)
        r = layer.max_rank
        xs = x.index_select(0, self.gather).view(self.num_slots, -1, x.shape[1])  # [n, P, in]
        h = torch.bmm(xs, layer.a[slots].transpose(1, 2))  # shrink: [n, P, S r]
        parts = [
            torch.bmm(h[:, :, i * r : (i + 1) * r], b[slots].transpose(1, 2))  # expand: [n, P, rows]
            for i, b in enumerate(layer.b)
        ]
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        delta = delta.view(-1, delta.shape[2]).index_select(0, self.picks)  # [t, out]
        if self.rows is None:
            return output.add_(delta)
        return output.index_add_(0, self.rows, delta)


@dataclass(slots=True)
class LoRASegments:
    """The adapter tokens grouped by slot, one segment per slot, for the Triton kernels."""

    token_rows: torch.Tensor  # [t] int32: the adapter tokens' rows in the step, segment after segment
    slots: torch.Tensor  # [n] int32: each segment's slot (-1, no adapter, would add nothing)
    starts: torch.Tensor  # [n] int32: its first place in token_rows
    lens: torch.Tensor  # [n] int32: its number of tokens
    max_len: int  # the longest segment's, on the host: the kernels' grid

    def apply(self, layer: _LayerSlots, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> output: [T, out], changed in place
        from engine.kernels import triton_lora

        h = triton_lora.lora_shrink(x, layer.a, self)  # [T, S r]
        return triton_lora.lora_expand(h, layer.b_stacked, layer.bounds, layer.max_rows, output, self)


@dataclass(slots=True)
class LoRAMapping:
    """A step's plan: its long runs (prefill chunks) in place, its short ones (decodes) padded;
    or, on CUDA, its segments in the Triton kernels (then neither runs nor padded)."""

    runs: LoRARuns | None
    padded: LoRAPadded | None
    segments: LoRASegments | None = None

    def apply(self, layer: _LayerSlots, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.segments is not None:
            return self.segments.apply(layer, x, output)
        if self.runs is not None:
            output = self.runs.apply(layer, x, output)
        if self.padded is not None:
            output = self.padded.apply(layer, x, output)
        return output


def plan_step(
    slots: list[int], query_lens: list[int], device: torch.device, *, use_triton: bool = False
) -> LoRAMapping | None:
    """The step's plan from each sequence's slot (-1: the base model) and token count, in batch
    order; None when no sequence has an adapter. use_triton: segments for the Triton kernels
    (engine.lora.slots chooses them on CUDA where triton imports)."""
    if use_triton:
        segments = plan_segments(slots, query_lens, device)
        return None if segments is None else LoRAMapping(None, None, segments)
    runs: list[list[int]] = []  # [slot, start, end]
    start = 0
    for slot, num_tokens in zip(slots, query_lens, strict=True):
        if slot >= 0:
            if runs and runs[-1][0] == slot and runs[-1][2] == start:
                runs[-1][2] += num_tokens
            else:
                runs.append([slot, start, start + num_tokens])
        start += num_tokens
    if not runs:
        return None
    long_runs = [run for run in runs if run[2] - run[1] >= MIN_RUN_TOKENS]
    short_runs = [run for run in runs if run[2] - run[1] < MIN_RUN_TOKENS]
    padded = _padded(short_runs, start, device) if short_runs else None
    if padded is None:  # few short runs, or too much padding: they run as runs too
        long_runs = runs
    return LoRAMapping(LoRARuns([tuple(run) for run in long_runs]) if long_runs else None, padded)


def plan_segments(slots: list[int], query_lens: list[int], device: torch.device) -> LoRASegments | None:
    """The step's adapter tokens grouped by slot, in slot order, each slot's in token order;
    base-model tokens are left out. None when no sequence has an adapter."""
    rows_of: dict[int, list[int]] = {}
    start = 0
    for slot, num_tokens in zip(slots, query_lens, strict=True):
        if slot >= 0:
            rows_of.setdefault(slot, []).extend(range(start, start + num_tokens))
        start += num_tokens
    if not rows_of:
        return None
    order = sorted(rows_of)
    lens = [len(rows_of[slot]) for slot in order]
    starts = list(accumulate(lens, initial=0))[:-1]
    token_rows = [row for slot in order for row in rows_of[slot]]
    # one host-to-device copy per step; the kernels read views of it
    packed = torch.tensor(token_rows + order + starts + lens, dtype=torch.int32, device=device)
    t, n = len(token_rows), len(order)
    return LoRASegments(
        packed[:t], packed[t : t + n], packed[t + n : t + 2 * n], packed[t + 2 * n :], max(lens)
    )


def _padded(runs: list[list[int]], num_step_tokens: int, device: torch.device) -> LoRAPadded | None:
    """`runs` as one padded batch per slot; None when they are no more runs than slots, or the
    padding would exceed MAX_PADDING rows per token."""
    rows_of: dict[int, list[int]] = {}
    for slot, first, end in runs:
        rows_of.setdefault(slot, []).extend(range(first, end))
    first, last = min(rows_of), max(rows_of)
    num_slots, width = last - first + 1, max(map(len, rows_of.values()))
    num_tokens = sum(map(len, rows_of.values()))
    if len(runs) <= len(rows_of) or num_slots * width > MAX_PADDING * num_tokens:
        return None
    gather = [0] * (num_slots * width)
    place_of: dict[int, int] = {}
    for slot, rows in rows_of.items():
        base = (slot - first) * width
        gather[base : base + len(rows)] = rows
        place_of.update((row, base + i) for i, row in enumerate(rows))
    token_rows = sorted(place_of)
    picks = [place_of[row] for row in token_rows]
    every_row = num_tokens == num_step_tokens
    return LoRAPadded(
        first,
        num_slots,
        torch.tensor(gather, dtype=torch.int64, device=device),
        torch.tensor(picks, dtype=torch.int64, device=device),
        None if every_row else torch.tensor(token_rows, dtype=torch.int64, device=device),
    )
