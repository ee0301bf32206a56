"""Model implementations, looked up by the `architectures` entry of a checkpoint's config.json."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class_for(architectures: list[str] | None) -> type[nn.Module]:
    """The class for the first supported name in `architectures`; ValueError if there is none."""
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"architecture {architectures or 'unspecified'} is not supported; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )
