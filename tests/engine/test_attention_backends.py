"""The paged attention backends equal plain causal attention over each sequence's whole context."""

from __future__ import annotations

import random

import pytest
import torch

from engine.forward_context import AttentionMetadata, group_by_length
from engine.layers.attention import Attention, causal_attention
from engine.layers.attention_backends import FlashAttentionBackend, SdpaBackend, flash_attn_available

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16


def _step(
    query_lens,
    context_lens,
    block_size,
    num_blocks,
    device,
    dtype,
    sliding_window=None,
    seed=0,
    soft_cap=None,
):
    """A layer with a paged cache already holding each sequence's earlier tokens, and one step's inputs.

    Returns (layer, q, k, v, metadata, full_k, full_v): full_* hold every sequence's whole context.
    """
    gen = torch.Generator().manual_seed(seed)
    layer = Attention(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, sliding_window, soft_cap)
    layer.k_cache = torch.zeros(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    layer.v_cache = torch.zeros_like(layer.k_cache)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)  # pages scattered over the pool, as after many steps
    tables, slots, full_k, full_v = [], [], [], []
    for q_len, ctx in zip(query_lens, context_lens, strict=True):
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        tables.append(table)
        k = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
        v = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        cached = ctx - q_len  # earlier steps wrote these
        layer.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[seq_slots[:cached]] = k[:cached]
        layer.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[seq_slots[:cached]] = v[:cached]
        slots += seq_slots[cached:]
        full_k.append(k)
        full_v.append(v)
    width = max(map(len, tables))
    t = sum(query_lens)
    q = torch.randn(t, NUM_HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    k_new = torch.cat([k[-n:] for k, n in zip(full_k, query_lens, strict=True)])
    v_new = torch.cat([v[-n:] for v, n in zip(full_v, query_lens, strict=True)])
    cu_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(context_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    metadata = AttentionMetadata(
        query_lens=list(query_lens),
        context_lens=list(context_lens),
        cu_query_lens=cu_q,
        cu_context_lens=cu_k,
        context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(
            [tb + [0] * (width - len(tb)) for tb in tables], dtype=torch.int32, device=device
        ),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        is_decode_only=all(n == 1 for n in query_lens),
    )
    if metadata.is_decode_only:  # groups of one or two rows, so the grouped path runs too
        metadata.decode_groups = group_by_length(context_lens, device, min_group=1)
    return layer, q, k_new, v_new, metadata, full_k, full_v


def _reference(q, metadata, full_k, full_v, scale, sliding_window, soft_cap=None):
    """Each sequence alone: causal attention over its whole context, keeping its last query rows."""
    out, start = [], 0
    for n, k, v in zip(metadata.query_lens, full_k, full_v, strict=True):
        ctx = k.shape[0]
        padded_q = torch.zeros(ctx, *q.shape[1:], dtype=q.dtype, device=q.device)
        padded_q[ctx - n :] = q[start : start + n]
        out.append(causal_attention(padded_q, k, v, scale, sliding_window, soft_cap)[ctx - n :])
        start += n
    return torch.cat(out)


CASES = {
    "decode-only": ([1, 1, 1, 1], [1, 17, 40, 5]),
    "fresh-prefills": ([7, 33, 1], [7, 33, 1]),
    "chunk-after-cache-and-decodes": ([16, 1, 9, 1], [48, 30, 9, 2]),
}


@pytest.mark.parametrize(("sliding_window", "soft_cap"), [(None, None), (8, None), (None, 1.0), (8, 1.0)])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_sdpa_backend_matches_causal_attention_over_the_whole_context(
    case, block_size, sliding_window, soft_cap
):
    query_lens, context_lens = CASES[case]
    layer, q, k, v, md, full_k, full_v = _step(
        query_lens, context_lens, block_size, 128, "cpu", torch.float32, sliding_window, soft_cap=soft_cap
    )
    out = SdpaBackend().forward(layer, q, k, v, md)
    expected = _reference(q, md, full_k, full_v, layer.scale, sliding_window, soft_cap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_soft_capped_causal_attention_is_the_capped_softmax(sliding_window):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, n, HEAD_DIM, generator=gen) for n in (NUM_HEADS, NUM_KV_HEADS, NUM_KV_HEADS))
    scale, cap = 0.7, 2.0
    k_full, v_full = (x.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k_full) * scale
    scores = cap * torch.tanh(scores / cap)
    pos = torch.arange(12)
    allowed = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < (sliding_window or 12))
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v_full)
    got = causal_attention(q, k, v, scale, sliding_window, cap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    uncapped = causal_attention(q, k, v, scale, sliding_window)
    assert (got - uncapped).abs().max() > 0.01  # the cap changed something


def test_new_keys_and_values_land_in_their_slots():
    layer, q, k, v, md, *_ = _step([3, 1], [3, 6], 4, 8, "cpu", torch.float32)
    SdpaBackend().forward(layer, q, k, v, md)
    flat = layer.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    torch.testing.assert_close(flat[md.slot_mapping], k)


@pytest.mark.gpu
@pytest.mark.parametrize(("sliding_window", "soft_cap"), [(None, None), (100, None), (100, 1.0)])
@pytest.mark.parametrize("case", CASES)
def test_flash_backend_matches_sdpa_on_cuda(case, sliding_window, soft_cap):
    if not flash_attn_available():
        pytest.fail("flash-attn is not installed on this GPU machine: the flash backend cannot be checked")
    query_lens, context_lens = CASES[case]
    # FlashAttention-2 reads pages of a multiple of 256 tokens.
    args = (query_lens, context_lens, 256, 16, "cuda", torch.bfloat16, sliding_window, 0, soft_cap)
    layer, q, k, v, md, *_ = _step(*args)
    flash = FlashAttentionBackend().forward(layer, q, k, v, md)
    layer, q, k, v, md, *_ = _step(*args)
    sdpa = SdpaBackend().forward(layer, q, k, v, md)
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)
