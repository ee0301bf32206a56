"""Rotary position embedding (RoPE), neox style as in Transformers, with its scaling variants.

cos/sin are precomputed once for every position up to the model's context length and
gathered by position id, so a step's tokens may come from any mix of sequences. They are
computed in float32 with the same operations as transformers' `modeling_rope_utils`, so a
position's angles are bit-identical to the ones Transformers uses for it.

`rope_type`: "default", "linear", "llama3", "yarn" (cos/sin scaled by its attention factor),
"dynamic" (NTK) and "longrope" (Phi-3's short and long factors; "su" is its old name). With
"partial_rotary_factor" < 1 only the first part of each head rotates (Phi-4-mini).

"dynamic" and "longrope" depend on the sequence length in Transformers: each forward
recomputes the frequencies from its longest position. Here a position's angles are the ones
Transformers gives it when it decodes that position: positions inside the original context
keep the unscaled (short) frequencies, and a position p past it gets those of a sequence of
p + 1 tokens. So the engine equals Transformers' generate() for every prompt that fits the
original context, and its output never depends on batching, chunking or preemption (a longer
prompt gets the angles it would get decoded token by token; Transformers' one-shot prefill
would give all of its positions those of the prompt's full length).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from engine.kernels import cpu_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


class RotaryEmbedding(nn.Module):
    fused = False  # set at build where the C++ kernels load (engine.layers.fused_ops)

    def __init__(self, head_dim: int, max_positions: int, rope_parameters: dict):
        """max_positions: the context length (rope_context_len); rope_parameters: rope_parameters_from_config."""
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
        # Not in the checkpoint: rebuilt from the config, so not persistent. [P, rotary_dim] float32
        cache = _cos_sin_cache(self.rotary_dim, max_positions, rope_parameters)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._last = None  # (positions, dtype, (cos, sin)) of the last call

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, H, D], k [T, Hkv, D] -> rotated q, k (same shapes and dtype)."""
        if (
            self.fused
            and self.rotary_dim == self.head_dim
            and self.cos_sin_cache.dtype == torch.float32
            and positions.dtype == torch.int64
            and positions.is_contiguous()
        ):
            # in place, one pass each (q and k are this step's fresh projections)
            cpu_kernels.rotary_(q, self.cos_sin_cache, positions)
            cpu_kernels.rotary_(k, self.cos_sin_cache, positions)
            return q, k
        cos, sin = self._cos_sin(positions, q.dtype)
        return self._rotate_heads(q, cos, sin), self._rotate_heads(k, cos, sin)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a forward passes the same positions tensor: gather and cast once. The
        # key holds the tensor itself (so its id is not reused); the model forgets it at the start
        # of each forward (forget_positions), so a buffer rewritten in place is read afresh.
        cached = self._last
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2]
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rotary_dim/2] each
        # transformers casts cos/sin to the activations' dtype before rotating; so do we.
        self._last = (positions, dtype, (cos.to(dtype), sin.to(dtype)))
        return self._last[2]

    def forget_positions(self) -> None:
        """Drop the cos/sin kept from the last call (DecoderModel calls it before each forward)."""
        self._last = None

    def _rotate_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return _rotate(x, cos, sin)
        # partial rotary: the first rotary_dim features rotate, the rest pass through
        return torch.cat((_rotate(x[..., : self.rotary_dim], cos, sin), x[..., self.rotary_dim :]), dim=-1)


def rope_parameters_from_config(config, layer_type: str | None = None) -> dict:
    """The rope dict of either config style, with "rope_type", "rope_theta" and
    "max_position_embeddings" always set (and "original_max_position_embeddings" for the types
    that scale from it).

    transformers 5.x: `config.rope_parameters` = {"rope_type", "rope_theta", scaling keys}, or
    one such dict per layer type (Gemma 3: "sliding_attention", "full_attention").
    transformers 4.x: `config.rope_theta` plus an optional `config.rope_scaling` dict whose
    type is under "rope_type" or the older "type"; `partial_rotary_factor` and Phi-3's
    `original_max_position_embeddings` at the top level.
    """
    # rope_scaling first: a 4.x config.json with a rope_scaling added to it (Qwen2.5's long-context
    # recipe) is read that way by transformers 5 too; on its config objects the two are one dict.
    params = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = "longrope" if rope_type == "su" else rope_type
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    params["max_position_embeddings"] = config.max_position_embeddings
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3).
        original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            original = params.get("original_max_position_embeddings", config.max_position_embeddings)
        params["original_max_position_embeddings"] = original
    return params


def rope_context_len(params: dict) -> int:
    """Positions the model can take: max_position_embeddings, extended by YaRN to
    original_max_position_embeddings * factor and by dynamic NTK to max_position_embeddings *
    factor (vLLM's rule). llama3, linear and longrope checkpoints already give the extended
    length as max_position_embeddings."""
    max_positions = params["max_position_embeddings"]
    factor = params.get("factor")
    if params["rope_type"] == "yarn" and factor:
        return max(max_positions, int(params["original_max_position_embeddings"] * factor))
    if params["rope_type"] == "dynamic" and factor:
        return max(max_positions, int(max_positions * factor))
    return max_positions


def config_context_len(config: dict) -> int:
    """rope_context_len of a config.json's contents (either style; the longest over layer types)."""
    namespace = SimpleNamespace(**{"max_position_embeddings": 2048, **config})
    params = getattr(namespace, "rope_parameters", None) or {}
    layer_types = [
        t for t in (getattr(namespace, "layer_types", None) or []) if isinstance(params.get(t), dict)
    ]
    return max(rope_context_len(rope_parameters_from_config(namespace, t)) for t in layer_types or [None])


def _cos_sin_cache(dim: int, num_positions: int, params: dict) -> torch.Tensor:
    """[num_positions, dim]: cos | sin of each position's angles (times the attention factor)."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    inv_freq, attention_factor = _inv_freq(dim, params)  # [D/2] float32
    positions = torch.arange(num_positions, dtype=torch.int64).float()
    # Elementwise product, as transformers does: an einsum/matmul could round differently.
    freqs = positions[:, None] * inv_freq[None, :]
    start = _first_long_position(params)
    if start is not None and num_positions > start:
        freqs[start:] = positions[start:, None] * _long_inv_freq(dim, params, positions[start:])
    cos, sin = freqs.cos(), freqs.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat((cos, sin), dim=-1)


def _inv_freq(dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """The frequencies of a position inside the original context, and the cos/sin factor."""
    rope_type, base = params["rope_type"], params["rope_theta"]
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, params)
    if rope_type == "longrope":
        return _longrope_inv_freq(dim, params, params["short_factor"]), _longrope_attention_factor(params)
    inv_freq = 1.0 / (base ** _exponents(dim))  # [D/2] float32
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    return inv_freq, 1.0  # default; dynamic inside max_position_embeddings


def _first_long_position(params: dict) -> int | None:
    # dynamic: from max_position_embeddings on; longrope: past original_max_position_embeddings
    if params["rope_type"] == "dynamic":
        return params["max_position_embeddings"]
    if params["rope_type"] == "longrope":
        return params["original_max_position_embeddings"]
    return None


def _long_inv_freq(dim: int, params: dict, positions: torch.Tensor) -> torch.Tensor:
    """Frequencies for positions past the original context: [N, D/2] (or [D/2] for longrope)."""
    if params["rope_type"] == "longrope":
        return _longrope_inv_freq(dim, params, params["long_factor"])
    # transformers' _compute_dynamic_ntk_parameters with seq_len = position + 1 (an int64 tensor)
    factor, max_positions = params["factor"], params["max_position_embeddings"]
    seq_len = positions.long() + 1
    ratio = (factor * seq_len / max_positions) - (factor - 1)
    # Transformers raises one 0-dim ratio at a time, which takes torch's scalar pow; a strided
    # view takes it too (a contiguous one takes the SIMD kernel, which rounds differently).
    strided = torch.empty(2 * len(ratio))[::2]
    strided.copy_(ratio)
    base = params["rope_theta"] * strided ** (dim / (dim - 2))
    return 1.0 / (base[:, None] ** _exponents(dim)[None, :])


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


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


def _yarn_inv_freq(dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters`, operation for operation."""
    base = params["rope_theta"]
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singularity
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope_inv_freq(dim: int, params: dict, ext_factors: list[float]) -> torch.Tensor:
    if len(ext_factors) != dim // 2:
        raise ValueError(
            f"longrope factors must have {dim // 2} entries (rotary dim / 2), got {len(ext_factors)}"
        )
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * params["rope_theta"] ** _exponents(dim))


def _longrope_attention_factor(params: dict) -> float:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    if params.get("attention_factor") is not None:
        return params["attention_factor"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, written per half; the same roundings, so the same bits.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
