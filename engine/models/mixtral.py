"""Mixtral: Mistral's decoder with a sparse mixture-of-experts MLP (softmax, top-k, renormalised).

The checkpoint names the MLP `block_sparse_moe` (router `gate`, experts' `w1` gate, `w3` up,
`w2` down, one tensor per expert); the engine's layer calls it `mlp` and stacks the experts
(engine.layers.moe).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import ActAndMul
from engine.layers.moe import FusedMoE, SparseMoeBlock
from engine.models.llama import LlamaForCausalLM
from engine.models.moe_checkpoint import ExpertCheckpoint, num_experts_of


class MixtralForCausalLM(ExpertCheckpoint, LlamaForCausalLM):
    expert_projections: ClassVar[dict[str, tuple[str, int | None]]] = {
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", None),
    }

    def make_mlp(self, config: PretrainedConfig, layer_index: int) -> nn.Module:
        return sparse_moe_block(config, config.intermediate_size, renormalize=True)

    def checkpoint_name(self, name: str) -> str:
        return super().checkpoint_name(name).replace(".block_sparse_moe.", ".mlp.")


def sparse_moe_block(
    config: PretrainedConfig, intermediate_size: int, *, renormalize: bool
) -> SparseMoeBlock:
    """Softmax-top-k router and SwiGLU experts (Mixtral, Qwen3-MoE)."""
    experts = FusedMoE(
        num_experts_of(config), config.hidden_size, intermediate_size, ActAndMul(config.hidden_act)
    )
    return SparseMoeBlock(experts, config.num_experts_per_tok, config.hidden_size, renormalize=renormalize)


ARCHITECTURES = {"MixtralForCausalLM": MixtralForCausalLM}
