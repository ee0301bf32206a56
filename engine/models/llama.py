"""The Llama family (Llama 2/3, Mistral, Qwen2) on the engine's layers (nano-vllm's qwen3.py shape).

Tokens are flattened across sequences: forward takes input_ids and positions [T] and
returns hidden states [T, hidden]; attention finds sequence boundaries in the step's
metadata (engine.forward_context). Parameter names are Transformers' except for the
fused projections, which `packed_modules_mapping` maps back.

Pipeline parallelism: a rank builds only its stage's layers (the others are PPMissingLayer,
with no parameters, so layer indices and tensor names stay global); the first stage holds the
embedding, the last the final norm and the LM head (and the embedding too when they are tied).
A stage other than the last returns (hidden, residual) for the next one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.distributed.parallel_state import get_parallel_state, stage_layers
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters_from_config


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        head_dim = _head_dim(config)
        qkv_bias, o_bias = _attention_bias(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, qkv_bias
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, o_bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.rotary_emb = rotary_emb  # shared by all layers: one cos/sin cache
        self.attn = Attention(self.num_heads, head_dim, head_dim**-0.5, self.num_kv_heads, sliding_window)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, hidden] -> qkv [T, (H + 2 Hkv) D]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(out.flatten(1, 2))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, sliding_window)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: returns (mlp output, residual so far).
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class PPMissingLayer(nn.Identity):
    """A layer that lives on another pipeline stage: no parameters, never called."""


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        state = get_parallel_state()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.local_layers = stage_layers(config.num_hidden_layers, state.pp_size, state.pp_rank)
        self.is_first_stage, self.is_last_stage = state.is_first_stage, state.is_last_stage
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size)
            if self.is_first_stage or (tied and self.is_last_stage)
            else None
        )
        self.rotary_emb = RotaryEmbedding(
            _head_dim(config), config.max_position_embeddings, rope_parameters_from_config(config)
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary_emb, window) if i in self.local_layers else PPMissingLayer()
            for i, window in enumerate(_sliding_windows(config))
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last_stage else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: list[torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.is_first_stage:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            hidden_states, residual = intermediate  # [T, hidden] each, from the previous stage
        for i in self.local_layers:
            hidden_states, residual = self.layers[i](positions, hidden_states, residual)
        if not self.is_last_stage:
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM checkpoints."""

    # HF tensor name component -> (our parameter, shard id for its weight_loader)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: lm_head is embed_tokens' parameter; the checkpoint's lm_head.weight is ignored.
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None
        if self.model.is_last_stage:
            shared = self.model.embed_tokens.weight if self.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, shared_weight=shared)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: list[torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [T] int64, sequences laid end to end -> hidden states [T, hidden].

        A pipeline stage after the first takes `intermediate` = [hidden, residual] from the
        previous stage instead of input_ids; a stage before the last returns (hidden, residual).
        """
        return self.model(input_ids, positions, intermediate)

    def is_other_stage_weight(self, name: str) -> bool:
        """A checkpoint tensor that belongs to another pipeline stage (the loader skips it)."""
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            return int(parts[2]) not in self.model.local_layers
        if parts[:2] == ["model", "embed_tokens"]:
            return self.model.embed_tokens is None
        if parts[:2] == ["model", "norm"]:
            return self.model.norm is None
        return parts[0] == "lm_head" and self.lm_head is None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] (only the rows that need logits) -> logits [N, vocab_size]."""
        return self.lm_head(hidden_states)


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_bias(config: PretrainedConfig) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj)."""
    # Qwen2 always has q/k/v biases and none on o_proj; Llama's attention_bias covers all four;
    # Mistral has no biases (and no attention_bias field).
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window, None for full attention (transformers 5.24's rule)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        # Mistral: one window for every layer (None when the config disables it).
        return [window] * config.num_hidden_layers
    # Qwen2: the config derives layer_types from use_sliding_window and max_window_layers
    # (layers >= max_window_layers slide) and sets sliding_window None when it is off.
    return [window if layer_type == "sliding_attention" else None for layer_type in layer_types]
