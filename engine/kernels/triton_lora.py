"""A step's LoRA contribution in two segmented Triton kernels (the SGMV idea, as vLLM's
lora_shrink / lora_expand).

The step's adapter tokens are grouped by slot into segments (engine.lora.mapping.LoRASegments):
`token_rows` lists their rows in the step segment after segment, and each segment has a slot,
a start in `token_rows` and a length. Both kernels run on the grid (token blocks of the longest
segment, output blocks, segments); a program past its segment's length, or of a segment whose
slot is -1 (no adapter), exits at once and writes nothing.

- shrink: h[row] = x[row] @ A[slot].T for the segment's rows, A [max_loras, S * R, in] stacking
  the S fused projections' A's, so one launch fills the rank-wide intermediate of all of them.
- expand: out[row, shard's rows] += h[row, shard's R columns] @ B[slot, shard's rows].T, B
  [max_loras, out, R] stacking the projections' B's by row; the output blocks run projection by
  projection (a block never spans two), each added in place: every output element belongs to
  one program, so there are no atomics and the sum does not depend on the launch order.

Products accumulate in float32 (exact float32 products for float32 inputs, not TF32); h is kept
in the activation's dtype, as the torch path keeps it. The grid's size comes from the host
(the longest segment, the number of segments), which the step's plan already knows.

Used by LoRA steps on CUDA (engine.lora.mapping); on CPU tensors it runs only under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported), which the tests use. Not yet
run on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from engine.lora.mapping import LoRASegments


@triton.jit
def _segment_rows(token_rows_ptr, seg_starts_ptr, seg, length, BLOCK_M: tl.constexpr):
    """The rows of this program's token block of its segment, and which of them are real."""
    places = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = places < length
    start = tl.load(seg_starts_ptr + seg)
    rows = tl.load(token_rows_ptr + start + places, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]: the step's tokens
    a_ptr,  # [max_loras, N, K]: N = S * R
    h_ptr,  # [T, N]: written for the segments' rows only
    token_rows_ptr,  # [t] int32: the adapter tokens' rows, segment after segment
    seg_slots_ptr,  # [num_segments] int32; -1: no adapter
    seg_starts_ptr,  # [num_segments] int32: each segment's first place in token_rows
    seg_lens_ptr,  # [num_segments] int32
    N,
    K,
    stride_xm,
    stride_xk,
    stride_al,
    stride_an,
    stride_ak,
    stride_hm,
    stride_hn,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,  # the interpreter's 16-bit tl.dot is wrong (triton 3.9): dot in float32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    length = tl.load(seg_lens_ptr + seg)
    if (slot < 0) | (tl.program_id(0) * BLOCK_M >= length):
        return
    rows, row_mask = _segment_rows(token_rows_ptr, seg_starts_ptr, seg, length, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        ks = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_offsets = rows[:, None] * stride_xm + ks[None, :] * stride_xk
        x = tl.load(x_ptr + x_offsets, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_offsets = slot * stride_al + cols[None, :] * stride_an + ks[:, None] * stride_ak
        a = tl.load(a_ptr + a_offsets, mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BK, BN]
        acc = _dot(x, a, acc, IEEE, UPCAST)
    h_offsets = rows[:, None] * stride_hm + cols[None, :] * stride_hn
    tl.store(h_ptr + h_offsets, acc.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr,  # [T, S * R]: the shrink's output
    b_ptr,  # [max_loras, OUT, R]: the projections' B's, stacked by row
    out_ptr,  # [T, OUT]: the layer's output, added into in place
    bounds_ptr,  # [S + 1] int32: projection s has the output rows bounds[s] .. bounds[s + 1] - 1
    token_rows_ptr,
    seg_slots_ptr,
    seg_starts_ptr,
    seg_lens_ptr,
    R,
    blocks_per_shard,  # output blocks per projection: those of the widest
    stride_hm,
    stride_hn,
    stride_bl,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    length = tl.load(seg_lens_ptr + seg)
    shard = tl.program_id(1) // blocks_per_shard
    first = tl.load(bounds_ptr + shard) + (tl.program_id(1) % blocks_per_shard) * BLOCK_N
    end = tl.load(bounds_ptr + shard + 1)
    if (slot < 0) | (tl.program_id(0) * BLOCK_M >= length) | (first >= end):
        return
    rows, row_mask = _segment_rows(token_rows_ptr, seg_starts_ptr, seg, length, BLOCK_M)
    cols = first + tl.arange(0, BLOCK_N)
    col_mask = cols < end
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, tl.cdiv(R, BLOCK_R)):
        rs = r0 * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = rs < R
        h_offsets = rows[:, None] * stride_hm + (shard * R + rs)[None, :] * stride_hn
        h = tl.load(h_ptr + h_offsets, mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        b_offsets = slot * stride_bl + cols[None, :] * stride_bn + rs[:, None] * stride_br
        b = tl.load(b_ptr + b_offsets, mask=r_mask[:, None] & col_mask[None, :], other=0.0)  # [BR, BN]
        acc = _dot(h, b, acc, IEEE, UPCAST)
    out_offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_mask[:, None] & col_mask[None, :]
    base = tl.load(out_ptr + out_offsets, mask=mask, other=0.0)
    tl.store(out_ptr + out_offsets, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, segments: LoRASegments) -> torch.Tensor:
    """x [T, in], a [max_loras, S * R, in] -> h [T, S * R] in x's dtype: row t is x[t] @ a[slot].T
    for the segments' rows; the other rows are left unwritten (garbage)."""
    _check_device(x)
    num_cols, in_size = a.shape[1], a.shape[2]
    h = x.new_empty(x.shape[0], num_cols)
    block_m = _block_m(segments.max_len)
    block_n = min(64, _pow2_at_least_16(num_cols))
    upcast = x.dtype != torch.float32 and not x.is_cuda
    grid = (triton.cdiv(segments.max_len, block_m), triton.cdiv(num_cols, block_n), segments.slots.numel())
    _shrink_kernel[grid](
        x,
        a,
        h,
        segments.token_rows,
        segments.slots,
        segments.starts,
        segments.lens,
        num_cols,
        in_size,
        *x.stride(),
        *a.stride(),
        *h.stride(),
        IEEE=x.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64,
    )
    return h


def lora_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    bounds: torch.Tensor,
    max_rows: int,
    output: torch.Tensor,
    segments: LoRASegments,
) -> torch.Tensor:
    """output [T, out] += each segment row's h [T, S * R] @ b[slot].T projection by projection,
    in place: b [max_loras, out, R]; bounds [S + 1] int32 on the device, the projections' first
    output rows and the end; max_rows the widest projection's. Returns output."""
    _check_device(h)
    num_shards, rank = bounds.numel() - 1, b.shape[2]
    block_m = _block_m(segments.max_len)
    block_n = 64
    blocks_per_shard = triton.cdiv(max_rows, block_n)
    upcast = h.dtype != torch.float32 and not h.is_cuda
    grid = (triton.cdiv(segments.max_len, block_m), num_shards * blocks_per_shard, segments.slots.numel())
    _expand_kernel[grid](
        h,
        b,
        output,
        bounds,
        segments.token_rows,
        segments.slots,
        segments.starts,
        segments.lens,
        rank,
        blocks_per_shard,
        *h.stride(),
        *b.stride(),
        *output.stride(),
        IEEE=h.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=min(64, _pow2_at_least_16(rank)),
    )
    return output


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError("the Triton LoRA kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests)")


def _block_m(max_len: int) -> int:
    return 16 if max_len <= 16 else 64  # decodes: a few tokens per slot; prefill chunks: many


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim >= 16
