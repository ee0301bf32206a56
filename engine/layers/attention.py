"""Attention: one module, backends chosen once at start-up.

Inputs are the step's tokens laid end to end: q [T, H, D], k and v [T, Hkv, D] (rope applied).
With no step metadata (get_attention_metadata() is None) the input is one sequence and
attention is plain causal attention with no cache: the reference path used by numeric tests.

A layer may soft-cap its attention logits (Gemma 2: cap * tanh(scores / cap) before the
softmax). PyTorch's fused SDPA kernels cannot, so soft-capped layers take an explicit
matmul-softmax-matmul path (engine.layers.explicit_attention) wherever SDPA
would run. So do layers with attention sinks (GPT-OSS: a learned logit per head that joins the
softmax's denominator and attends to nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_attention_metadata, get_attention_split
from engine.layers.explicit_attention import explicit_attention


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,  # [num_heads] sink logits (GPT-OSS); the owner loads them
    ) -> None:
        super().__init__()
        self.sinks = sinks
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window  # attend to at most this many most recent tokens (Mistral)
        self.logits_soft_cap = logits_soft_cap or None  # Gemma 2's attn_logit_softcapping
        # Paged KV cache of this layer, bound by the model runner: [num_blocks, block_size, Hkv, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # fp8 KV cache: stored value = x / scale (engine.quant.kv_cache calibrates them).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self._backend = None

    @property
    def backend(self):
        """The engine.attention backend, bound by the model runner."""
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        # Binding checks that the backend can run this layer, so a model it cannot run stops
        # start-up with the backend's reason instead of giving wrong answers later.
        check = getattr(backend, "check_layer", None)
        if check is not None:
            check(self)
        self._backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        split = get_attention_split()
        if split is not None:  # a forward captured or run in pieces (piecewise CUDA graphs)
            return split.attend(self, q, k, v)
        metadata = get_attention_metadata()
        if metadata is None or self._backend is None:
            return causal_attention(
                q, k, v, self.scale, self.sliding_window, self.logits_soft_cap, self.sinks
            )
        return self._backend.forward(self, q, k, v, metadata)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sequence, no cache. q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    length = q.shape[0]
    mask = None
    explicit = bool(logits_soft_cap) or sinks is not None
    if explicit or (sliding_window is not None and sliding_window < length):
        pos = torch.arange(length, device=q.device)
        diff = pos[:, None] - pos[None, :]
        mask = diff >= 0
        if sliding_window is not None:
            mask &= diff < sliding_window
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if explicit:
        return explicit_attention(q, k, v, mask, scale, logits_soft_cap, sinks).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[0] != k.shape[0]
    )
    return out.transpose(0, 1)
