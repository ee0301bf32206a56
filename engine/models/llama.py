"""The Llama family: Llama 2/3, Mistral, Qwen2 (and Qwen2.5), on the shared decoder (engine.models.base)."""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig

from engine.layers.norm import RMSNorm
from engine.models.base import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
    layer_rotary,
    rotary_embeddings,
    sliding_windows,
)


class LlamaForCausalLM(DecoderForCausalLM):
    """LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM checkpoints."""

    qk_norm: ClassVar[type[RMSNorm] | None] = None  # per-head q/k RMSNorm before RoPE (Qwen3)

    def build_model(self, config: PretrainedConfig) -> DecoderModel:
        rotaries = rotary_embeddings(config)
        windows = sliding_windows(config)
        qkv_bias, o_bias = _attention_bias(config)
        mlp_bias = bool(getattr(config, "mlp_bias", False))

        def make_layer(i: int) -> DecoderLayer:
            attention = DecoderAttention(
                config,
                layer_rotary(rotaries, config, i),
                sliding_window=windows[i],
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                qk_norm=self.qk_norm,
            )
            return DecoderLayer(config, attention, GatedMLP(config, config.hidden_act, mlp_bias))

        return DecoderModel(config, make_layer)


def _attention_bias(config: PretrainedConfig) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj)."""
    # Qwen2 always has q/k/v biases and none on o_proj; Llama's (and Qwen3's) attention_bias
    # covers all four; Mistral and Phi-3 have no biases (and no attention_bias field).
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
