"""Quantised experts: bitsandbytes int8 / NF4 / FP4, FP8 or W8A8 per expert, as the dense linear layers have it.

Each expert's slice of a FusedMoE's stacked float weights (gate_up_proj[e] [2I, H] and
down_proj[e] [H, I], this rank's shard) becomes the weight of its own small linear layer whose
`quant_method` is the dense path's method (engine.quant.bnb, engine.quant.fp8, engine.quant.w8a8),
built the same way (W8A8: int8 codes per row and fbgemm's packed weight per expert, on the host). An expert's matmul therefore has the dense layers' numerics: int8 is LLM.int8
(activations quantised per token, columns above the outlier threshold in float), 4-bit
dequantises that one expert's weight to the compute dtype at its matmul (both quantised at the
model's `.to(device)`), fp8 stores the weight as e4m3 with one scale per output row (quantised
here, on the host) and runs torch._scaled_mm with the tokens quantised per row at each call.
fp8 needs sizes that are multiples of 16 (per rank, under tensor parallelism): other experts
are refused by name (engine.quant.plan), or stay float if quantization_skip_modules lists them.
The stacked float parameters are dropped. Biases stay float, and so does the router (`gate`),
as in vLLM: its logits decide which experts run.

Quantised experts run one matmul per non-empty expert (engine.layers.moe's
_quantized_grouped_linear), on CPU and CUDA alike: the grouped-GEMM Triton kernel
(engine.kernels.triton_moe) and torch._grouped_mm read the stacked float weights, which are
gone, so `use_triton` is set False.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quant.base import LinearMethod

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # FusedMoE's stacked parameters


class ExpertLinear(nn.Module):
    """One expert's projection [out, in], run by a LinearMethod (no bias: FusedMoE adds it)."""

    def __init__(self, weight: torch.Tensor, method: LinearMethod) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None  # model_weight_bytes reads it as it does a linear layer's
        self.quant_method = method
        method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, None)


class QuantizedExpertsMethod:
    """Turns a FusedMoE's stacked weights into one quantised ExpertLinear per expert and projection."""

    def __init__(self, linear_method: LinearMethod) -> None:
        self.linear_method = linear_method
        self.name = linear_method.name

    def process_weights_after_loading(self, experts: nn.Module) -> None:
        """On the host, after loading: replaces `experts.<w>` by `experts.<w>_experts` (a ModuleList)."""
        if getattr(experts, "is_mxfp4", False):  # only on a CPU build under Triton's interpreter
            raise ValueError("MXFP4 experts kept packed for the Triton kernel cannot be quantised again")
        for name in EXPERT_WEIGHTS:
            stacked = getattr(experts, name).data  # [E, out, in]
            try:
                linears = [ExpertLinear(weight.clone(), self.linear_method) for weight in stacked]
            except ValueError as e:  # every expert has the same shape: the first one says it
                raise ValueError(f"{name} of each expert: {e}") from None
            delattr(experts, name)
            experts.register_parameter(name, None)
            setattr(experts, f"{name}_experts", nn.ModuleList(linears))
        experts.quant_method = self
        experts.use_triton = False  # a grouped-GEMM kernel over the stacked float weights cannot run these

    def out_features(self, experts: nn.Module, name: str) -> int:
        return getattr(experts, f"{name}_experts")[0].out_features

    def apply(self, experts: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] (the tokens routed to `expert`) -> [N, out]
        return getattr(experts, f"{name}_experts")[expert](x)

    def weight_bytes(self, experts: nn.Module) -> int:
        """Bytes of every expert's quantised weights (scales included), biases excluded."""
        return sum(
            self.linear_method.weight_bytes(linear)
            for name in EXPERT_WEIGHTS
            for linear in getattr(experts, f"{name}_experts")
        )


def is_moe_experts(module: nn.Module) -> bool:
    return getattr(module, "is_moe_experts", False)
