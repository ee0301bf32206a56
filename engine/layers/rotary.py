"""Rotary position embedding (RoPE), neox style as in Transformers' Llama.

cos/sin are precomputed once for every position up to max_position_embeddings and
gathered by position id, so a step's tokens may come from any mix of sequences.
inv_freq and the cache are computed in float32 with the same operations as
transformers' `modeling_rope_utils`, so the angles are bit-identical to theirs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position_embeddings: int, rope_parameters: dict):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _compute_inv_freq(head_dim, rope_parameters)  # [D/2] float32
        positions = torch.arange(max_position_embeddings, dtype=torch.int64).float()
        # Elementwise product, as transformers does: an einsum/matmul could round differently.
        freqs = positions[:, None] * inv_freq[None, :]
        # Not in the checkpoint: rebuilt from the config, so not persistent.
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D], k [T, Hkv, D] -> rotated q, k (same shapes and dtype)."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        # transformers casts cos/sin to the activations' dtype before rotating; so do we.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_parameters_from_config(config) -> dict:
    """The rope dict of either config style, with "rope_type" and "rope_theta" always set.

    transformers 5.x: `config.rope_parameters` = {"rope_type", "rope_theta", scaling keys}.
    transformers 4.x: `config.rope_theta` plus an optional `config.rope_scaling` dict whose
    type is under "rope_type" or the older "type".
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    if params["rope_type"] == "llama3":
        # transformers gives a top-level original_max_position_embeddings priority.
        original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        params["original_max_position_embeddings"] = original
    return params


def _compute_inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    base = params["rope_theta"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)  # [D/2] float32
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """transformers' `_compute_llama3_parameters`, operation for operation."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, written per half; the same roundings, so the same bits.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
