"""FP8 (e4m3) paged KV cache with one scale per layer for keys and one for values.

A cached value is stored as round(x / scale) in e4m3 and read back as fp8 * scale: one byte
per element instead of two (bfloat16) or four (float32), so the same memory holds 2x or 4x
the tokens. The scales are fixed at start-up by one calibration forward over a fixed
pseudo-random token sequence (each layer's largest |k| and |v|, times a headroom), because
a paged cache cannot rescale what it already holds; values beyond the range saturate at
+-448 instead of overflowing. Only the portable SDPA backend reads it (it dequantises pages
as it gathers them); flash-attn 2 takes float16/bfloat16 caches only.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448
CALIBRATION_TOKENS = 256
HEADROOM = 2.0  # runtime values may exceed the calibration maximum by this much before saturating
_MIN_AMAX = 1e-6


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_KV_DTYPE if kv_cache_dtype == "fp8" else model_dtype


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [..] float -> the same shape in e4m3, viewed as uint8 (index ops do not take fp8 on CPU)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE).view(torch.uint8)


def dequantize(pages_u8: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """uint8 view of e4m3 values -> `dtype`, rescaled."""
    return pages_u8.view(FP8_KV_DTYPE).to(dtype) * scale


@torch.no_grad()
def calibrate_kv_scales(
    model: nn.Module, layers: list[nn.Module], vocab_size: int, positions: torch.Tensor
) -> None:
    """Set each attention layer's k_scale and v_scale from one forward over fixed tokens.

    positions [CALIBRATION_TOKENS] on the model's device: inside its RoPE tables (a model whose
    context is shorter than CALIBRATION_TOKENS repeats them; ModelRunner._profile_positions).
    """
    amax: dict[int, list[float]] = {}

    def record(layer, args):
        _, k, v = args
        amax[id(layer)] = [float(k.abs().max()), float(v.abs().max())]

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(vocab_size, (CALIBRATION_TOKENS,), generator=generator).to(positions.device)
        model(tokens, positions)  # no metadata: plain causal attention
    finally:
        for hook in hooks:
            hook.remove()
    for layer in layers:
        k_max, v_max = amax[id(layer)]
        layer.k_scale = max(k_max, _MIN_AMAX) * HEADROOM / FP8_MAX
        layer.v_scale = max(v_max, _MIN_AMAX) * HEADROOM / FP8_MAX
