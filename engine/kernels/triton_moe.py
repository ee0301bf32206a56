"""The experts' grouped matmuls as one Triton kernel per projection (vLLM's fused_moe design).

The T * k (token, expert) pairs are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M (align_pairs): every BLOCK_M block of the sorted list then belongs to a
single expert, whose id the block reads from `block_expert`. One program computes one
[BLOCK_M, BLOCK_N] tile: it gathers its A rows through the sorted pair ids (pair // TOP_K is
the token for the first projection, the pair itself for the second), multiplies them by its
expert's slice of the stacked weight, adds the expert's bias, multiplies the router weight if
asked, and writes each row back to its pair's row. Padding slots hold an out-of-range pair id
and are neither read nor written. Written to need no host sync (not yet checked on a GPU):
the grid has an upper bound of blocks, and blocks past the last expert's run exit at once.

With expert parallelism (engine.layers.moe) the pairs routed to another rank's experts go to
a sentinel expert past this rank's last, whose blocks are skipped, and drop out of the sum.

MXFP4 experts (MXFP4 = True; GPT-OSS's, engine.quant.mxfp4) stay packed: B is read as the
uint8 blocks [E, N, K / 32, 16] (two e2m1 codes a byte, the even-indexed value in the low
nibble) and the e8m0 scales [E, N, K / 32]; each [BLOCK_K, BLOCK_N] tile is dequantised in
registers (the 16 e2m1 values looked up in a 16-entry table, times 2 ** (scale - 127) built
as float32 exponent bits, as Triton's matmul_ogs places the scale) and cast to the
activation's dtype before the same dot with float32 accumulation. BLOCK_K is a multiple of 32,
so a tile never splits a scale's block. A scale byte of 0 (2 ** -127, subnormal) reads as 0.

Used by FusedMoE on CUDA (engine.layers.moe); on CPU tensors it runs only under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported), which the tests use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (TOP_K = k) or pairs (TOP_K = 1)
    b_ptr,  # [E, N, K]: each expert's weight, out = a @ b[e].T; MXFP4: blocks [E, N, K / 2] uint8
    c_ptr,  # [T * k, N]: one row per pair
    bias_ptr,  # with HAS_BIAS: [E, N]
    weights_ptr,  # with MUL_WEIGHT: [T * k] router weights, one per pair
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M] pair ids grouped by expert; padding: num_pairs
    block_expert_ptr,  # [num_blocks] the expert of each block; -1: past the last run
    scales_ptr,  # with MXFP4: [E, N, K / 32] uint8, e8m0
    values_ptr,  # with MXFP4: [16] float32, the e2m1 value of each 4-bit code
    num_pairs,
    N,
    K,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_bias_e,
    stride_se,
    stride_sn,
    stride_sk,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    MXFP4: tl.constexpr,  # b is packed MXFP4: dequantised here, tile by tile
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products, not TF32
    UPCAST: tl.constexpr,  # the interpreter's 16-bit tl.dot is wrong (triton 3.9): dot in float32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = pairs < num_pairs
    a_rows = pairs // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        ks = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a_offsets = a_rows[:, None] * stride_am + ks[None, :] * stride_ak
        a = tl.load(a_ptr + a_offsets, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        if MXFP4:
            b = _mxfp4_tile(
                b_ptr + expert * stride_be + cols[None, :] * stride_bn + (ks // 2)[:, None] * stride_bk,
                scales_ptr + expert * stride_se + cols[None, :] * stride_sn + (ks // 32)[:, None] * stride_sk,
                values_ptr,
                ks,
                b_mask,
            ).to(a.dtype)  # multiplied in the activation's dtype
        else:
            b_offsets = expert * stride_be + cols[None, :] * stride_bn + ks[:, None] * stride_bk
            b = tl.load(b_ptr + b_offsets, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # noqa: SIM108 (a constexpr branch: two different dot calls)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias_e + cols, mask=col_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if MUL_WEIGHT:
        weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)
        acc = acc * weight.to(tl.float32)[:, None]
    c_offsets = pairs[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _mxfp4_tile(byte_ptrs, scale_ptrs, values_ptr, ks, mask):
    """[BLOCK_K, BLOCK_N] float32 weights from their bytes (value k in byte k // 2) and scales."""
    packed = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    codes = (packed >> ((ks % 2) * 4)[:, None]) & 0x0F  # even k: the low nibble
    values = tl.load(values_ptr + codes)  # the 16 e2m1 values: every code is in range
    exponent = tl.load(scale_ptrs, mask=mask, other=0).to(tl.int32)
    return values * (exponent << 23).to(tl.float32, bitcast=True)  # 2 ** (exponent - 127)


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_pairs [num_blocks * block_m] int32, block_expert [num_blocks] int32).

    The pairs (flat index t * k + j) sorted by expert, each expert's run padded to a multiple
    of block_m with the id T * k; num_blocks is an upper bound (the padded runs need at most
    T * k + E * (block_m - 1) slots), and blocks past the last run have expert -1.
    """
    flat = ids.flatten()
    num_pairs = flat.numel()
    num_blocks = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m)
    # [E]; not bincount, which reads the largest id on the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat)
    )
    blocks = (counts + block_m - 1) // block_m  # [E]: blocks per expert
    block_end = blocks.cumsum(0)  # [E]
    order = flat.argsort(stable=True)  # pair ids grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    slot = (block_end - blocks)[sorted_experts] * block_m + rank
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[slot] = order.to(torch.int32)
    block_index = torch.arange(num_blocks, device=flat.device)
    block_expert = torch.searchsorted(block_end, block_index, right=True)  # E past the last run
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


class PackedWeight(NamedTuple):
    """An MXFP4 stacked weight [E, N, K], kept packed (engine.quant.mxfp4's layout)."""

    blocks: torch.Tensor  # [E, N, K / 32, 16] uint8
    scales: torch.Tensor  # [E, N, K / 32] uint8
    values: torch.Tensor  # [16] float32: mxfp4.FP4_VALUES, on the weights' device


def grouped_linear(
    a: torch.Tensor,
    weight: torch.Tensor | PackedWeight,
    bias: torch.Tensor | None,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    *,
    num_pairs: int,
    top_k: int,
    block_m: int,
    router_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row p of the result [num_pairs, N] is a[p // top_k] @ weight[e].T (+ bias[e]) (* router
    weight p), e being pair p's expert; weight [E, N, K], or packed MXFP4."""
    is_mxfp4 = isinstance(weight, PackedWeight)
    if is_mxfp4:  # blocks as [E, N, K / 2]: value k is in byte k // 2
        b, scales, values = weight.blocks.flatten(2), weight.scales, weight.values
        n, k = b.shape[1], scales.shape[2] * 32
    else:  # scales and values: any pointer, never read
        b, scales, values = weight, weight, weight
        n, k = weight.shape[1], weight.shape[2]
    out = a.new_empty(num_pairs, n)
    block_n, block_k = (64, 32) if n >= 64 else (32, 32)
    upcast = a.dtype != torch.float32 and not a.is_cuda  # CPU tensors: the interpreter
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        b if bias is None else bias,  # any pointer when there is none: never read
        b if router_weights is None else router_weights,
        sorted_pairs,
        block_expert,
        scales,
        values,
        num_pairs,
        n,
        k,
        *a.stride(),
        *b.stride(),
        *out.stride(),
        0 if bias is None else bias.stride(0),
        *scales.stride(),
        TOP_K=top_k,
        HAS_BIAS=bias is not None,
        MUL_WEIGHT=router_weights is not None,
        MXFP4=is_mxfp4,
        IEEE=a.dtype == torch.float32 or upcast,
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def triton_fused_experts(experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """engine.layers.moe.fused_experts with both projections in the grouped Triton kernel:
    this rank's share of the experts' weighted sum [T, H] (no all-reduce)."""
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError("the Triton MoE kernel runs on CPU tensors only under TRITON_INTERPRET=1 (tests)")
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    block_m = 16 if num_pairs <= 16 * experts.num_local_experts else 64
    local_ids, is_local = _local_ids(experts, ids)
    # expert parallel: another rank's pairs go to a sentinel expert whose blocks are skipped
    sorted_pairs, block_expert = align_pairs(local_ids, experts.num_local_experts + 1, block_m)
    block_expert = torch.where(block_expert < experts.num_local_experts, block_expert, -1)
    common = dict(num_pairs=num_pairs, block_m=block_m)
    gate_up = grouped_linear(
        x,
        _weight(experts, "gate_up_proj"),
        experts.gate_up_proj_bias,
        sorted_pairs,
        block_expert,
        top_k=top_k,
        **common,
    )  # [T * k, 2 I]
    hidden = experts.activation(gate_up).contiguous()  # [T * k, I]
    down_bias = experts.down_proj_bias if experts.adds_down_bias else None
    flat_weights = weights.flatten().float().contiguous()
    down = grouped_linear(
        hidden,
        _weight(experts, "down_proj"),
        down_bias,
        sorted_pairs,
        block_expert,
        top_k=1,
        router_weights=flat_weights,
        **common,
    )  # [T * k, H], weighted; the skipped pairs' rows are never written
    down = torch.where(is_local.unsqueeze(-1), down.view(num_tokens, top_k, -1).float(), 0.0)
    return down.sum(dim=1).to(x.dtype)


def _weight(experts, name: str) -> torch.Tensor | PackedWeight:
    """The experts' stacked `name` (gate_up_proj, down_proj): float, or packed MXFP4."""
    if not experts.is_mxfp4:
        return getattr(experts, name)
    blocks, scales = getattr(experts, f"{name}_blocks"), getattr(experts, f"{name}_scales")
    return PackedWeight(blocks, scales, experts.mxfp4_values)


def _local_ids(experts, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (local expert ids, num_local_experts for another rank's; is_local [T, k])."""
    local = ids - experts.expert_start
    is_local = (local >= 0) & (local < experts.num_local_experts)
    return torch.where(is_local, local, experts.num_local_experts), is_local
