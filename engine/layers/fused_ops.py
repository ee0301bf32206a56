"""The modules with a one-pass C++ path on CPU (engine.kernels.cpu_kernels' fused ops), switched
on once, at build, by `use_fused_cpu_ops`: RMSNorm with its residual add, rotary embedding and
SiLU-and-multiply. Each module still takes PyTorch's ops for inputs its C++ pass does not cover
(a partial rotary, a GeLU activation, 3-d activations)."""

from __future__ import annotations

from torch import nn

from engine.kernels import cpu_kernels
from engine.layers.activation import ActAndMul
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

FUSABLE = (RMSNorm, ActAndMul, RotaryEmbedding)


def use_fused_cpu_ops(model: nn.Module) -> bool:
    """Switch every fusable module of a CPU model to its C++ pass; False (nothing switched) where
    the kernels cannot load here (cpu_kernels.load says why, once)."""
    if not cpu_kernels.load():
        return False
    for module in model.modules():
        if isinstance(module, FUSABLE):
            module.fused = True
    return True
