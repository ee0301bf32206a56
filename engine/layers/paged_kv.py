"""One attention layer's paged KV cache, written and read by the attention backends.

layer.k_cache, layer.v_cache: [num_blocks, block_size, Hkv, D]. An fp8 cache is stored as
uint8 views with a scale per layer (engine.quant.kv_cache) and dequantised as it is read.
"""

from __future__ import annotations

import torch

from engine.forward_context import AttentionMetadata
from engine.quant import kv_cache as fp8_kv


def write_kv(layer, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] go to their cache slots ([T] int64)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if fp8_kv.is_fp8(layer.k_cache):  # stored as uint8 views: index_copy_ takes no fp8 on CPU
        k_cache, v_cache = layer.k_cache.view(torch.uint8), layer.v_cache.view(torch.uint8)
        k, v = fp8_kv.quantize(k, layer.k_scale), fp8_kv.quantize(v, layer.v_scale)
    else:
        k_cache, v_cache = layer.k_cache, layer.v_cache
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(layer, block_table: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `context_len` cached keys and values: [L, Hkv, D] each."""
    num_blocks = -(-context_len // layer.k_cache.shape[1])
    blocks = block_table[:num_blocks].long()
    keys = _pages(layer, "k", blocks, 1, None)[0, :context_len]
    values = _pages(layer, "v", blocks, 1, None)[0, :context_len]
    return keys, values


def padded_context(
    layer, block_tables: torch.Tensor, context_lens: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of decode rows' contexts padded to `length`: keys and values [B, Hkv, L, D] in
    `dtype`, and the mask [B, L] (True: attend) that hides the padding and what lies outside
    the layer's sliding window. block_tables [B, n], context_lens [B]."""
    batch = block_tables.shape[0]
    blocks = block_tables[:, : -(-length // layer.k_cache.shape[1])].flatten().long()
    keys = _pages(layer, "k", blocks, batch, dtype)[:, :length].transpose(1, 2)
    values = _pages(layer, "v", blocks, batch, dtype)[:, :length].transpose(1, 2)
    positions = torch.arange(length, device=keys.device).unsqueeze(0)
    lens = context_lens.to(keys.device).unsqueeze(1)  # [B, 1]
    mask = positions < lens
    if layer.sliding_window is not None:
        mask &= positions >= lens - layer.sliding_window
    return keys, values, mask


def decode_group_inputs(md: AttentionMetadata, block_size: int):
    """The layer-independent inputs of md.decode_groups, once per step: (the rows in group order
    [B] int64, and per group its block tables cut to its longest context [b, n] (contiguous),
    its context lengths [b] and that longest context)."""
    order = torch.cat([rows for rows, _ in md.decode_groups])
    groups = []
    for rows, max_len in md.decode_groups:
        tables = md.block_tables[rows][:, : -(-max_len // block_size)].contiguous()
        groups.append((tables, md.context_lens_tensor[rows], max_len))
    return order, groups


def _pages(layer, which: str, blocks: torch.Tensor, batch: int, dtype: torch.dtype | None) -> torch.Tensor:
    """The layer's k or v cache [num_blocks, S, Hkv, D], blocks [batch * n] -> [batch, n * S, Hkv, D].

    index_select copies whole pages; it is ~2.5x faster on CPU than advanced indexing. An fp8
    cache is dequantised here, to `dtype` (the query's) or float32.
    """
    cache = layer.k_cache if which == "k" else layer.v_cache
    if fp8_kv.is_fp8(cache):
        scale = layer.k_scale if which == "k" else layer.v_scale
        pages = fp8_kv.dequantize(
            cache.view(torch.uint8).index_select(0, blocks), scale, dtype or torch.float32
        )
    else:
        pages = cache.index_select(0, blocks)
        pages = pages if dtype is None else pages.to(dtype)
    return pages.view(batch, -1, *cache.shape[2:])
