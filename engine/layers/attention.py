"""Attention: one module, backends chosen once at start-up.

Inputs are the step's tokens laid end to end: q [T, H, D], k and v [T, Hkv, D] (rope applied).
With no step metadata (get_attention_metadata() is None) the input is one sequence and
attention is plain causal attention with no cache: the reference path used by numeric tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_attention_metadata


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window  # attend to at most this many most recent tokens (Mistral)
        # Paged KV cache of this layer, bound by the model runner: [num_blocks, block_size, Hkv, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # fp8 KV cache: stored value = x / scale (engine.quant.kv_cache calibrates them).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.backend = None  # an engine.attention backend, bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        metadata = get_attention_metadata()
        if metadata is None or self.backend is None:
            return causal_attention(q, k, v, self.scale, self.sliding_window)
        return self.backend.forward(self, q, k, v, metadata)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """One sequence, no cache. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    length = q.shape[0]
    mask = None
    if sliding_window is not None and sliding_window < length:
        pos = torch.arange(length, device=q.device)
        diff = pos[:, None] - pos[None, :]
        mask = (diff >= 0) & (diff < sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)
