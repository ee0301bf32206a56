"""RMSNorm, optionally fused with the residual add that precedes it (vLLM, nano-vllm)."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu_kernels


class RMSNorm(nn.Module):
    # set at build where the C++ kernels load (engine.layers.fused_ops; CPU, option cpu_fused_ops)
    fused = False
    _gemma = False  # (1 + weight), in float32 (GemmaRMSNorm)

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [..., hidden] -> norm(x); with `residual`, (norm(x + residual), x + residual).

        The sum is the next layer's residual: the decoder never materialises it twice.
        """
        fusable = residual is None or residual.is_contiguous()
        if self.fused and fusable and x.dim() == 2 and x.dtype == self.weight.dtype:
            # one pass, rounding where the ops below round (engine/kernels/csrc/fused_ops.cpp)
            out, total = cpu_kernels.rms_norm(x, residual, self.weight, self.eps, self._gemma)
            return out if residual is None else (out, total)
        if residual is None:
            return self._norm(x)
        # Added in the activations' dtype, as transformers' `residual + hidden_states`.
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the dtype; cast back before the weight (transformers).
        input_dtype = x.dtype
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in float32, and casts back only after that."""

    _gemma = True

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).to(input_dtype)
