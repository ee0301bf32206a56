"""Gemma 2 and Gemma 3 (text) on the shared decoder (engine.models.base).

What sets them apart from Llama: GeGLU (gelu-tanh), RMSNorm scaling by (1 + weight),
embeddings times sqrt(hidden_size), a norm after attention and another before and after the
MLP, attention scaled by query_pre_attn_scalar ** -0.5, final-logit soft-capping, and local
(sliding-window) layers alternating with global ones. Gemma 2 soft-caps its attention logits
too; Gemma 3 instead normalises each head's q and k and gives local and global layers their
own RoPE (base 10k local, 1M global, the global one possibly scaled). Transformers' Gemma 3
does not soft-cap attention logits whatever attn_logit_softcapping says, and neither do we.

Gemma3ForConditionalGeneration (the multimodal checkpoints): its language model only; the
vision tower and projector tensors are skipped. Images are the front end's to refuse.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PretrainedConfig

from engine.layers.norm import GemmaRMSNorm
from engine.models.base import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderModel,
    GatedMLP,
    input_norm,
    layer_rotary,
    rotary_embeddings,
    sliding_windows,
)


class GemmaDecoderLayer(torch.nn.Module):
    """Sandwich norms: x + norm(attn(norm(x))), then + norm(mlp(norm(.)))."""

    def __init__(self, config: PretrainedConfig, self_attn: DecoderAttention, mlp: GatedMLP):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # As in DecoderLayer, each residual add is fused into the norm that follows it.
        hidden_states, residual = input_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class Gemma2ForCausalLM(DecoderForCausalLM):
    is_gemma3: ClassVar[bool] = False  # q/k norms, per-layer-type RoPE, no attention soft-cap

    @classmethod
    def soft_caps_attention(cls, config: dict) -> bool:
        """Whether a checkpoint with this config.json soft-caps its attention logits, as
        build_model reads it (an absent attn_logit_softcapping is transformers' default, 50):
        engine.executor.runtime does not choose the CPU kernel for such a model."""
        return not cls.is_gemma3 and config.get("attn_logit_softcapping", 50.0) is not None

    def build_model(self, config: PretrainedConfig) -> DecoderModel:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                "use_bidirectional_attention (an embedding model) is not supported: the engine is causal"
            )
        rotaries = rotary_embeddings(config)
        windows = sliding_windows(config)
        soft_cap = None if self.is_gemma3 else config.attn_logit_softcapping
        hidden_act = getattr(config, "hidden_activation", None) or config.hidden_act

        def make_layer(i: int) -> GemmaDecoderLayer:
            attention = DecoderAttention(
                config,
                layer_rotary(rotaries, config, i),
                sliding_window=windows[i],
                qkv_bias=config.attention_bias,
                o_bias=config.attention_bias,
                qk_norm=GemmaRMSNorm if self.is_gemma3 else None,
                scale=config.query_pre_attn_scalar**-0.5,
                logits_soft_cap=soft_cap,
            )
            return GemmaDecoderLayer(config, attention, GatedMLP(config, hidden_act))

        return DecoderModel(config, make_layer, GemmaRMSNorm, embed_scale=config.hidden_size**0.5)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    is_gemma3 = True


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    # transformers writes the legacy names (language_model.model.*); its in-memory names are
    # model.language_model.*: both load.
    checkpoint_prefixes: ClassVar[dict[str, str]] = {
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "model.language_model.": "model.",
    }
    ignored_checkpoint_tensors = (
        *DecoderForCausalLM.ignored_checkpoint_tensors,
        r"^(model\.)?vision_tower\.",
        r"^(model\.)?multi_modal_projector\.",
    )


ARCHITECTURES = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
}
