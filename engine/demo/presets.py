"""The architectures engine.demo.checkpoints can build: one Preset per checkpoint, and its config.

``tiny`` (~5M parameters) is for unit tests; ``small`` (~125M) is for benchmarks. The other
``tiny-*`` presets cover every family the engine serves (engine.models) and the options that
change its numerics: sliding windows, biases, tied embeddings, MQA, RoPE scalings, q/k norms,
soft-caps, fused projections, partial rotary, a multimodal wrapper. Most are deliberately
smaller than ``tiny`` (hidden size 64, a 512-token vocabulary) to keep the tests fast.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    """Architecture of a generated checkpoint; maps onto the config class's kwargs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    # Above Llama's 0.02 default: at 0.02 random logits are near-uniform and greedy
    # decoding collapses into one- or two-token loops, hiding KV-cache/batching bugs.
    initializer_range: float = 0.05
    architecture: str = "LlamaForCausalLM"  # a key of engine.demo.architectures.ARCHITECTURES
    # Further config fields (sliding window, biases, tying, rope scaling); override defaults.
    options: dict[str, object] = dataclasses.field(default_factory=dict)
    # Transformers initialises norm weights to 1 and biases to 0, so a norm or bias loaded
    # into the wrong place would not change the logits; random values make it show.
    random_norms_and_biases: bool = False

    def config_kwargs(self) -> dict[str, object]:
        shape = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_CONFIG}
        return {**shape, **self.options}


_NOT_CONFIG = ("architecture", "options", "random_norms_and_biases")

_TINY = Preset(256, 4, 8, 2, 688, 4096, 2048)
# hidden 64, 4 heads of 16, 2 KV heads; 512 tokens
_MINI = Preset(64, 4, 4, 2, 128, 512, 256, random_norms_and_biases=True)
_MOE = dataclasses.replace(_MINI, num_hidden_layers=2, intermediate_size=32)
_MOE_QWEN3 = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# Gemma 3's local/global pattern at 4 layers, each type with its own RoPE, q/k norms
_GEMMA3 = {
    "head_dim": 16,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
    },
    "query_pre_attn_scalar": 16,
    "tie_word_embeddings": True,
}


def _longrope(rotary_dim: int) -> dict[str, object]:
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.0 + 0.5 * i for i in range(half)],
    }


def _yarn(**extra: object) -> dict[str, object]:
    """YaRN over 4 x 64 tokens (the presets' prompts run past 64)."""
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        **extra,
    }


PRESETS: dict[str, Preset] = {
    "tiny": _TINY,
    "small": Preset(768, 12, 12, 4, 2048, 32000, 4096),
    # ~0.9M parameters: a step's arithmetic is negligible, so a decode run measures the host
    # work per step (loadtest/bench_engine.py --preset micro --workload decode)
    "micro": Preset(128, 2, 4, 2, 344, 2048, 512),
    # Llama-3.2-1B's shapes (our 32k tokenizer): the GPU benchmark's checkpoint, built on the GPU machine.
    "gpu-1b": Preset(2048, 16, 32, 8, 8192, 32000, 4096),
    # sliding_window 16 < a 40-token test prompt, so the window masks something.
    "tiny-mistral": dataclasses.replace(
        _TINY,
        architecture="MistralForCausalLM",
        options={"sliding_window": 16},
        random_norms_and_biases=True,
    ),
    # q/k/v biases are implied by Qwen2; layers >= max_window_layers (2, 3) slide, 0 and 1 do not.
    "tiny-qwen2": dataclasses.replace(
        _TINY,
        architecture="Qwen2ForCausalLM",
        options={
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
        },
        random_norms_and_biases=True,
    ),
    "tiny-mqa": dataclasses.replace(
        _TINY,
        num_key_value_heads=1,
        options={"tie_word_embeddings": True, "attention_bias": False},
        random_norms_and_biases=True,
    ),
    # original_max_position_embeddings 64: wavelengths < 16 kept, > 64 divided by 8, between
    # smoothed, so all three llama3 branches touch this head_dim's 16 frequencies. MHA, and
    # attention_bias/mlp_bias to cover the biases Llama allows.
    "tiny-llama3": dataclasses.replace(
        _TINY,
        num_key_value_heads=8,
        options={
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "attention_bias": True,
            "mlp_bias": True,
        },
        random_norms_and_biases=True,
    ),
    # Dynamic NTK past max_position_embeddings 64: the test's 64-token prompt decodes past it.
    "tiny-llama-dynamic": dataclasses.replace(
        _MINI,
        max_position_embeddings=64,
        options={"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    # GQA, head_dim 32 (not hidden / heads), untied, no biases.
    "tiny-qwen3": dataclasses.replace(_MINI, architecture="Qwen3ForCausalLM", options={"head_dim": 32}),
    # MQA, tied, attention biases, YaRN (context 4 x 64), layers >= 2 slide over 16 tokens.
    "tiny-qwen3-yarn": dataclasses.replace(
        _MINI,
        architecture="Qwen3ForCausalLM",
        num_key_value_heads=1,
        max_position_embeddings=128,
        options={
            "tie_word_embeddings": True,
            "attention_bias": True,
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
            "rope_parameters": _yarn(),
        },
    ),
    # Local layers (0, 2) slide over 8 tokens; both soft-caps small enough to bite (random
    # weights give small logits); query_pre_attn_scalar 2 is not head_dim 16.
    "tiny-gemma2": dataclasses.replace(
        _MINI,
        architecture="Gemma2ForCausalLM",
        options={
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 2,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 2.0,
            "tie_word_embeddings": True,
        },
    ),
    # MQA, untied, no soft-caps, attention biases.
    "tiny-gemma2-mqa": dataclasses.replace(
        _MINI,
        architecture="Gemma2ForCausalLM",
        num_key_value_heads=1,
        options={
            "head_dim": 16,
            "sliding_window": 8,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "attention_bias": True,
        },
    ),
    # Local/global layers with their own RoPE (linear-scaled global), q/k norms, final soft-cap.
    "tiny-gemma3": dataclasses.replace(
        _MINI,
        architecture="Gemma3ForCausalLM",
        options={**_GEMMA3, "final_logit_softcapping": 2.0},
    ),
    # The multimodal wrapper (a tiny SigLIP tower): the engine loads its language model.
    "tiny-gemma3-mm": dataclasses.replace(
        _MINI,
        architecture="Gemma3ForConditionalGeneration",
        num_key_value_heads=1,
        options=_GEMMA3,
    ),
    # Phi-3-128k style: fused qkv/gate_up, LongRoPE (context 256; long factors from 96 tokens
    # on, past the test sequences: see engine.layers.rotary), a window of 48.
    "tiny-phi3": dataclasses.replace(
        _MINI,
        architecture="Phi3ForCausalLM",
        options={
            "original_max_position_embeddings": 96,
            "sliding_window": 48,
            "rope_parameters": _longrope(16),
        },
    ),
    # Phi-4-mini style: partial rotary (12 of 16 dims), tied, MQA, LongRoPE.
    "tiny-phi4-mini": dataclasses.replace(
        _MINI,
        architecture="Phi3ForCausalLM",
        num_key_value_heads=1,
        options={
            "original_max_position_embeddings": 96,
            "partial_rotary_factor": 0.75,
            "tie_word_embeddings": True,
            "rope_parameters": {**_longrope(12), "partial_rotary_factor": 0.75},
        },
    ),
    # Mixture of experts (2 layers, 8 experts of intermediate size 32): Mixtral top-2
    # renormalised with a 16-token window; Qwen3-MoE top-2 not renormalised, layer 1 dense
    # (mlp_only_layers); GPT-OSS top-4 with router and expert biases, sinks, a clamped SwiGLU
    # whose limit bites, local (8-token) and global layers and YaRN past 64 tokens.
    "tiny-mixtral": dataclasses.replace(
        _MOE,
        architecture="MixtralForCausalLM",
        options={"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 16},
    ),
    "tiny-qwen3-moe": dataclasses.replace(
        _MOE,
        architecture="Qwen3MoeForCausalLM",
        options={
            **_MOE_QWEN3,
            "norm_topk_prob": False,
            "mlp_only_layers": [1],
            "head_dim": 32,
        },
    ),
    # loadtest/bench_moe.py: `tiny`'s shapes with 8 experts of half its MLP, top-2: the same
    # active parameters per token as `tiny`, four times its MLP parameters in all.
    "bench-mixtral": dataclasses.replace(
        _TINY,
        architecture="MixtralForCausalLM",
        intermediate_size=344,
        options={"num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "tiny-gpt-oss": dataclasses.replace(
        _MOE,
        architecture="GptOssForCausalLM",
        max_position_embeddings=256,
        options={
            "num_local_experts": 8,
            "num_experts_per_tok": 4,
            "head_dim": 16,
            "sliding_window": 8,
            "swiglu_limit": 0.3,
            "rope_parameters": _yarn(beta_fast=32.0, beta_slow=1.0, truncate=False),
        },
    ),
}
