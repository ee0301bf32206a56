"""MXFP4 (OCP microscaling FP4), the format of GPT-OSS's expert weights: dequantised at load.

A checkpoint stores a weight [..., K] as `*_blocks` [..., K / 32, 16] uint8 (two e2m1 values a
byte, the even-indexed one in the low nibble) and `*_scales` [..., K / 32] uint8 (an e8m0
exponent per block of 32, biased by 127), as Transformers' mxfp4 integration reads them.
"""

from __future__ import annotations

import torch

# e2m1: the 16 values of a 4-bit code (sign bit 3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
_SCALE_BIAS = 127


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)} "
            f"(expected blocks [..., G, {BLOCK // 2}] and scales [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - _SCALE_BIAS).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] (K a multiple of 32) -> (blocks, scales): each block's largest magnitude
    sets its exponent, each value rounds to the nearest e2m1 value."""
    values = weight.float().unflatten(-1, (-1, BLOCK))  # [..., G, 32]
    amax = values.abs().amax(dim=-1)
    # 6 = 1.5 * 2**2 is e2m1's largest value
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax))
    exponent = exponent.clamp(-_SCALE_BIAS, _SCALE_BIAS)
    scaled = values / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1)  # [..., G, 32] in 0..15
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + _SCALE_BIAS).to(torch.uint8)
