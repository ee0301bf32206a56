"""The Transformers classes that build each architecture of engine.demo.presets: one
(config class, model class) pair per `architectures` entry a preset names."""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SiglipVisionConfig,
)


def _gemma3_multimodal_config(**kwargs) -> Gemma3Config:
    # The top level names the architecture; the rest is the language model's.
    architectures = kwargs.pop("architectures")
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    text = Gemma3TextConfig(**kwargs)
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, architectures=architectures
    )


ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": (MistralConfig, MistralForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
    "Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM),
    "Gemma2ForCausalLM": (Gemma2Config, Gemma2ForCausalLM),
    "Gemma3ForCausalLM": (Gemma3TextConfig, Gemma3ForCausalLM),
    "Gemma3ForConditionalGeneration": (_gemma3_multimodal_config, Gemma3ForConditionalGeneration),
    "Phi3ForCausalLM": (Phi3Config, Phi3ForCausalLM),
    "MixtralForCausalLM": (MixtralConfig, MixtralForCausalLM),
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "GptOssForCausalLM": (GptOssConfig, GptOssForCausalLM),
}
