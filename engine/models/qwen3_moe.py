"""Qwen3-MoE: Qwen3's decoder (q/k norms) with sparse mixture-of-experts MLPs.

A layer is sparse when it is not in `mlp_only_layers` and (index + 1) is a multiple of
`decoder_sparse_step` (Transformers' rule); other layers keep a dense MLP of
`intermediate_size`. The router's top-k probabilities are renormalised when `norm_topk_prob`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from engine.models.base import GatedMLP
from engine.models.mixtral import sparse_moe_block
from engine.models.moe_checkpoint import ExpertCheckpoint, num_experts_of
from engine.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(ExpertCheckpoint, Qwen3ForCausalLM):
    expert_projections: ClassVar[dict[str, tuple[str, int | None]]] = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "down_proj": ("down_proj", None),
    }

    def make_mlp(self, config: PretrainedConfig, layer_index: int) -> nn.Module:
        if not is_sparse_layer(config, layer_index):
            return GatedMLP(config, config.hidden_act)
        renormalize = bool(getattr(config, "norm_topk_prob", False))
        return sparse_moe_block(config, config.moe_intermediate_size, renormalize=renormalize)


def is_sparse_layer(config: PretrainedConfig, layer_index: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_index not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts_of(config) > 0
        and (layer_index + 1) % step == 0
    )


ARCHITECTURES = {"Qwen3MoeForCausalLM": Qwen3MoeForCausalLM}
