"""Gated MLP activations on the fused gate_up projection: SwiGLU (SiLU) and GeGLU (GELU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_kernels

# config.hidden_act / hidden_activation -> the function, as transformers' ACT2FN computes it
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
}


class ActAndMul(nn.Module):
    """act(gate) * up of x = [gate | up]."""

    fused = False  # set at build where the C++ kernels load (engine.layers.fused_ops)

    def __init__(self, hidden_act: str = "silu"):
        super().__init__()
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden activation {hidden_act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
            )
        self.hidden_act = hidden_act
        self.act = _ACTIVATIONS[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * I] = [gate | up] -> [T, I]
        if self.fused and self.act is F.silu and x.dim() == 2:
            return cpu_kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
