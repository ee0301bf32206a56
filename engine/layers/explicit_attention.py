"""Explicit attention: matmul, soft-cap, mask, softmax, matmul, as Transformers' eager path.

PyTorch's fused SDPA kernels can neither soft-cap the logits (Gemma 2) nor add attention
sinks (GPT-OSS), so layers with either take this path wherever SDPA would run: in the
reference path (engine.layers.attention.causal_attention) and in the SDPA backend's prompt
and decode steps (engine.layers.attention_backends).
"""

from __future__ import annotations

import torch

from engine.forward_context import AttentionMetadata
from engine.layers.paged_kv import padded_context


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    logits_soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [..., H, Q, D], k/v [..., Hkv, L, D], mask [..., Q, L] (True: attend) -> [..., H, Q, D].

    Transformers' eager attention, operation for operation: scores in q's dtype, soft-capped,
    masked, softmax in float32. sinks [H]: one more logit per head in the softmax (GPT-OSS),
    dropped after it.
    """
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2).to(q.dtype)) * scale
    if logits_soft_cap:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)  # as Transformers does
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
        return torch.matmul(probs, v.to(q.dtype))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.to(q.dtype))


def explicit_decode(layer, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
    """Decode rows [B, H, D] of a soft-capped layer or one with sinks: each group of
    md.decode_groups (or all rows) gathered and padded as the SDPA backend's decode does, then
    explicit attention."""
    groups = md.decode_groups if len(md.decode_groups) > 1 else [(slice(None), md.max_context_len)]
    out = torch.empty_like(q)
    for rows, length in groups:
        block_tables, lens = md.block_tables[rows], md.context_lens_tensor[rows]
        keys, values, mask = padded_context(layer, block_tables, lens, length, q.dtype)  # [b, Hkv, L, D]
        queries = q[rows].unsqueeze(2)  # [b, H, 1, D]
        attended = explicit_attention(
            queries,
            keys,
            values,
            mask.view(block_tables.shape[0], 1, 1, length),
            layer.scale,
            layer.logits_soft_cap,
            getattr(layer, "sinks", None),
        )
        out[rows] = attended.squeeze(2)
    return out
