"""Paged decode attention in Triton: each query row reads its own pages in place.

Used by the "triton" attention backend for decode-only steps on CUDA where the flash-attn
package is missing. Unlike the SDPA path (gather pages, pad, mask), it does no host-side
work per step and allocates nothing: every shape is fixed by the batch size, and the loop
over a row's pages reads its length from device memory. That makes decode steps capturable
as CUDA graphs (engine.executor.cuda_graphs).

One program per (sequence, query head) walks the sequence's pages with an online softmax in
float32. On CPU tensors the same kernel runs under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported): slow, but it lets the CPU test suite check the kernel the GPU
runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    sinks_ptr,  # with HAS_SINKS: [H] float, one more logit per head in the softmax (GPT-OSS)
    scale,
    window,  # attend to at most this many most recent positions; <= 0: no window
    soft_cap,  # with HAS_SOFT_CAP: scores become soft_cap * tanh(scores / soft_cap) (Gemma 2)
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,  # cache strides (k and v share them): block, slot, kv head; the last dim is 1
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    context_len = tl.load(context_lens_ptr + row)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * scale
    start = tl.where(window > 0, tl.maximum(context_len - window, 0), 0)  # no branch: one type for `start`
    slots = tl.arange(0, BLOCK_SIZE)
    m_i = tl.max(tl.full([BLOCK_SIZE], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_SIZE], tl.float32), axis=0)
    acc = tl.zeros([D_PAD], tl.float32)
    for block in range(start // BLOCK_SIZE, tl.cdiv(context_len, BLOCK_SIZE)):
        page = tl.load(block_tables_ptr + row * stride_bt + block).to(tl.int64)
        pos = block * BLOCK_SIZE + slots
        valid = (pos < context_len) & (pos >= start)
        offsets = page * stride_cb + slots[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        if HAS_SOFT_CAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf: 1)
            scores = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * scores / soft_cap) + 1.0))
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(v_cache_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if HAS_SINKS:  # the sink joins the denominator and attends to nothing
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha
        l_i = l_i * alpha + tl.exp(sink - m_new)
    out = acc / tl.where(l_i > 0, l_i, 1.0)  # an empty row (a CUDA graph's padding) gives zeros
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence, already in the cache) against each sequence's
    first context_lens[b] cached positions; caches [num_blocks, block_size, Hkv, D];
    block_tables [B, max_blocks] int32; sinks [H] or None. Returns [B, H, D] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    if not q.is_cuda and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton decode kernel runs on CPU tensors only under TRITON_INTERPRET=1 (tests)"
        )
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_heads)](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        q if sinks is None else sinks,  # any pointer when there are none: never read
        scale,
        sliding_window or 0,
        float(logits_soft_cap or 0.0),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        HAS_SOFT_CAP=bool(logits_soft_cap),
        HAS_SINKS=sinks is not None,
    )
    return out
