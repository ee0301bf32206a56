"""The Llama family: Llama 2/3, Mistral, Qwen2 (and Qwen2.5), on the shared decoder (engine.models.base)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
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

        def make_layer(i: int) -> DecoderLayer:
            attention = self.make_attention(config, layer_rotary(rotaries, config, i), windows[i])
            return DecoderLayer(config, attention, self.make_mlp(config, i))

        return DecoderModel(config, make_layer)

    def make_attention(
        self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int | None
    ) -> DecoderAttention:
        qkv_bias, o_bias = _attention_bias(config)
        return DecoderAttention(
            config,
            rotary,
            sliding_window=sliding_window,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=self.qk_norm,
        )

    def make_mlp(self, config: PretrainedConfig, layer_index: int) -> nn.Module:
        """Layer `layer_index`'s MLP (a mixture-of-experts family returns its sparse block)."""
        return GatedMLP(config, config.hidden_act, bool(getattr(config, "mlp_bias", False)))


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
