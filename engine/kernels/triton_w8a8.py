"""W8A8 int8 on CUDA in two Triton kernels: per-token activation quantisation, then an int8 GEMM
on the tensor cores with int32 sums and both scales applied in its epilogue.

- quantize_rows: one program per token row reads the row twice (its absolute maximum, then the
  codes): x_q = round_half_even(x * (A / amax)) in int8, s_x = amax / A; the same float32
  operations as engine.quant.w8a8.quantize_per_token, the reference the tests hold it to.
- int8_linear: y[m, n] = float(sum_k x_q[m, k] * w_q[n, k]) * s_x[m] * s_w[n] (+ b[n]), in the
  activation's dtype. The sums are exact int32 (tl.dot with int8 operands, out_dtype int32); the
  epilogue rounds once per product, as the CPU kernels do.

Tensor cores multiply int8 x int8 into int32 without an int16 step, so weights and activations
both use codes in [-127, 127] (B = A = 127), as on VNNI CPUs. Used by `quantization: w8a8` on
CUDA (engine.quant.w8a8, kernel "triton"); on CPU tensors it runs only under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported), which the tests use. Not yet
run on a GPU (loadtest/gpu_check.sh runs its test and a W8A8 row when a device is lent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_AMAX = 1e-12  # as engine.quant.w8a8: an all-zero row still gets a finite scale


@triton.jit
def _round_half_even(v):
    """torch.round's rounding of float32 values (|v| < 2**23): ties to the even integer."""
    low = tl.floor(v)
    frac = v - low  # exact here
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [M, K] float
    q_ptr,  # [M, K] int8, contiguous
    scale_ptr,  # [M] float32
    K,
    stride_xm,
    act_max,
    min_amax,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    running = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        running = tl.maximum(running, tl.abs(x))
    amax = tl.maximum(tl.max(running, axis=0), min_amax)
    inverse = act_max / amax
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        codes = _round_half_even(x * inverse)
        tl.store(q_ptr + row * K + offs, codes.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, amax / act_max)


@triton.jit
def _int8_gemm_kernel(
    a_ptr,  # [M, K] int8: the activations' codes
    b_ptr,  # [N, K] int8: the weight's codes, one row per output channel
    c_ptr,  # [M, N] output
    a_scale_ptr,  # [M] float32
    b_scale_ptr,  # [N] float32
    bias_ptr,  # [N] or a dummy
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0)
        b = tl.load(b_cols + k[:, None], mask=(k[:, None] < K) & n_mask[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    c = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(out, c.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quantize_rows(x: torch.Tensor, act_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous) -> (codes [M, K] int8, scales [M] float32)."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_kernel[(M,)](
            x,
            codes,
            scales,
            K,
            x.stride(0),
            float(act_max),
            MIN_AMAX,
            BLOCK_K=min(1024, triton.next_power_of_2(K)),
        )
    return codes, scales


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_max: int = 127,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x W^T + b through int8 codes: x [M, K] float, w_q [N, K] int8, w_scale [N] float32
    -> [M, N] in `out_dtype` (default x's dtype)."""
    x_q, x_scale = quantize_rows(x, act_max)
    M, K = x_q.shape
    N = w_q.shape[0]
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return out
    block_m = 16 if M <= 16 else 64  # decode steps: few rows; tl.dot needs 16 at least
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int8_gemm_kernel[grid](
        x_q,
        w_q,
        out,
        x_scale,
        w_scale,
        bias if bias is not None else w_scale,  # never read without HAS_BIAS
        M,
        N,
        K,
        x_q.stride(0),
        w_q.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out
