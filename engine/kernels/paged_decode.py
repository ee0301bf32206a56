"""Decode attention that reads the paged KV cache in place, compiled by torch.compile (inductor).

A decode step has one query per sequence, so its attention is bound by reading the keys and
values. SDPA needs them contiguous: the eager path copies every sequence's pages out of the
pool first (index_select), then SDPA reads the copy, three passes over the context per layer.
Written as an indexed multiply-and-sum, inductor fuses the block-table lookup into the
reduction loops: one pass, no copy. The same definition compiles to C++ on CPU and to Triton
on CUDA. Numerics: q.k, the softmax and p.v in float32, the output in the query's dtype.

Compiled once per process, at engine start-up (`warm_up`), for dynamic batch and context sizes:
a batch of one sequence or a context of one block is padded to two, so that no size of 1 gets
a graph of its own (torch.compile specialises on 0 and 1) and no step waits for a compile.
Inductor caches the result on disk, so later processes start faster. Where torch.compile
cannot run (no C++ compiler), warm_up says why in the log and the eager SDPA path is used.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_compiled = None  # the compiled function, or False once compiling failed


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, S, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, n] int32: the sequences' first n blocks (padding: any block)
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """[B, H, D], or None when the compiled kernel is unavailable (use the eager path)."""
    global _compiled
    if _compiled is None:
        _compiled = _compile()
    if _compiled is False:
        return None
    batch = q.shape[0]
    if batch == 1:  # a second, identical row: the graph for B >= 2 serves
        q, block_tables, context_lens = (torch.cat([t, t]) for t in (q, block_tables, context_lens))
    if block_tables.shape[1] == 1:  # a second block, beyond every context: masked out
        block_tables = torch.cat([block_tables, block_tables], dim=1)
    block_tables = block_tables.contiguous()  # a column slice otherwise: its strides are a guard too
    # tensors, not Python numbers: torch.compile would specialise (and recompile) on each value
    scale_t = torch.tensor(scale, dtype=torch.float32)
    window = torch.tensor(sliding_window or _NO_WINDOW, dtype=torch.int64, device=q.device)
    try:
        return _compiled(q, k_cache, v_cache, block_tables, context_lens, scale_t, window)[:batch]
    except Exception as e:  # never fail a step for the kernel: the eager path computes the same
        log.warning(
            "compiled decode attention failed (%s: %s); decoding eagerly from now on", type(e).__name__, e
        )
        _compiled = False
        return None


_NO_WINDOW = 2**62


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale, window):
    """The kernel's definition, eager. scale: 0-d float32; window: 0-d int64 (2**62: none)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    num_blocks = block_tables.shape[1]
    index = block_tables.long()
    keys = k_cache[index].permute(0, 3, 1, 2, 4).unsqueeze(2)  # [B, Hkv, 1, n, S, D]
    values = v_cache[index].permute(0, 3, 1, 2, 4).unsqueeze(2)
    queries = q.view(batch, num_kv_heads, group, 1, 1, head_dim).float()
    scores = (queries * keys.float()).sum(-1) * scale.to(q.device)  # [B, Hkv, G, n, S]
    positions = torch.arange(num_blocks * block_size, device=q.device).view(1, num_blocks, block_size)
    lens = context_lens.long().view(batch, 1, 1)
    visible = (positions < lens) & (positions >= lens - window)
    scores = scores.masked_fill(~visible.view(batch, 1, 1, num_blocks, block_size), float("-inf"))
    top = scores.amax(dim=(-2, -1), keepdim=True)
    weights = (scores - top).exp()
    total = weights.sum(dim=(-2, -1))  # [B, Hkv, G]
    out = (weights.unsqueeze(-1) * values.float()).sum(dim=(3, 4)) / total.unsqueeze(-1)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def warm_up(q_shape: tuple[int, int], k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Compile now, on a layer's own cache and its query's (heads, head size); False where the
    kernel cannot run here. Reads the cache, writes nothing."""
    if _compiled is False:
        return False
    # The call as steps make it: grad mode and which tensors are inference tensors (the step's,
    # not the cache) are guards; and a batch or table width equal to another size would be
    # taken for the same symbol (torch.compile's duck sizing), so they are chosen apart.
    taken = {*q_shape, *k_cache.shape, *(k_cache._base.shape if k_cache._base is not None else ())}
    batch, width = [n for n in range(2, 1024) if n not in taken][:2]
    with torch.inference_mode():
        q = torch.zeros(batch, *q_shape, dtype=k_cache.dtype, device=k_cache.device)
        tables = torch.zeros(batch, width, dtype=torch.int32, device=k_cache.device)
        lens = torch.ones(batch, dtype=torch.int32, device=k_cache.device)
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0, None) is not None


def _compile():
    # Sizes of 1 (one sequence, one block, one KV head, block_size 1) and each dtype get graphs
    # of their own: more than dynamo's default of 8 over a process that runs several models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    try:
        return torch.compile(paged_decode_reference, dynamic=True, fullgraph=True)
    except Exception as e:  # inductor raises many kinds (no compiler, unsupported platform)
        log.warning(
            "decode attention runs eagerly: torch.compile is unavailable here (%s: %s)", type(e).__name__, e
        )
        return False
