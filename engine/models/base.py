"""The decoder-only skeleton every family shares (nano-vllm's qwen3.py shape).

A family is one module in engine/models: it builds its decoder layer from the pieces here
(DecoderAttention, GatedMLP, DecoderLayer) and in engine/layers, subclasses DecoderForCausalLM,
and lists the `architectures` names it serves in a module-level ARCHITECTURES dict;
engine.models finds it by itself.

Tokens are flattened across sequences: forward takes input_ids and positions [T] and
returns hidden states [T, hidden]; attention finds sequence boundaries in the step's
metadata (engine.forward_context). Parameter names are Transformers' except for the fused
projections, which `packed_modules_mapping` maps back.

Pipeline parallelism: a rank builds only its stage's layers (the others are PPMissingLayer,
with no parameters, so layer indices and tensor names stay global); the first stage holds the
embedding, the last the final norm and the LM head (and the embedding too when they are tied).
A stage other than the last returns (hidden, residual) for the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.distributed.parallel_state import get_parallel_state, stage_layers
from engine.layers.activation import ActAndMul
from engine.layers.attention import Attention
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_context_len, rope_parameters_from_config

# A pipeline stage's input after the first stage: [hidden, residual] ([T, hidden] each), or None.
Intermediate = list[torch.Tensor] | None
# A stage's output: hidden states [T, hidden] from the last stage, (hidden, residual) from the others.
StageOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class DecoderAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k RMSNorm, RoPE, paged attention, o projection."""

    def __init__(
        self,
        config: PretrainedConfig,
        rotary_emb: RotaryEmbedding,
        *,
        sliding_window: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: type[RMSNorm] | None = None,  # Qwen3 and Gemma 3 normalise each head's q and k
        scale: float | None = None,  # default head_dim ** -0.5
        logits_soft_cap: float | None = None,
    ):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads, qkv_bias
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, o_bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # per-head norms: replicated on every tensor-parallel rank
        self.q_norm = qk_norm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = qk_norm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # shared by the layers of one rope: one cos/sin cache
        scale = head_dim**-0.5 if scale is None else scale
        self.attn = Attention(
            self.num_heads, head_dim, scale, self.num_kv_heads, sliding_window, logits_soft_cap
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, hidden] -> qkv [T, (H + 2 Hkv) D]
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H, D]
        return self.o_proj(out.flatten(1, 2))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused: SwiGLU (silu) or GeGLU (gelu)."""

    def __init__(self, config: PretrainedConfig, hidden_act: str, bias: bool = False):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias)
        self.act_fn = ActAndMul(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)), then + mlp(norm(.)) (Llama, Qwen, Mistral, Phi-3)."""

    def __init__(self, config: PretrainedConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: returns (mlp output, residual so far).
        hidden_states, residual = input_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def input_norm(
    norm: RMSNorm, hidden_states: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's first norm -> (normed, residual): the first layer starts the residual stream with
    its input; every later one adds its input to the residual inside the norm (fused)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class PPMissingLayer(nn.Identity):
    """A layer that lives on another pipeline stage: no parameters, never called."""


class DecoderModel(nn.Module):
    """Embedding, this stage's decoder layers, final norm."""

    def __init__(
        self,
        config: PretrainedConfig,
        make_layer: Callable[[int], nn.Module],
        norm_class: type[RMSNorm] = RMSNorm,
        embed_scale: float | None = None,  # Gemma: embeddings times sqrt(hidden_size)
    ):
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
        # transformers keeps the scale as a float32 tensor and casts it to the weights' dtype
        self.embed_scale = (
            None
            if embed_scale is None
            else float(torch.tensor(embed_scale, dtype=torch.float32).to(torch.get_default_dtype()))
        )
        self.layers = nn.ModuleList(
            make_layer(i) if i in self.local_layers else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = norm_class(config.hidden_size, config.rms_norm_eps) if self.is_last_stage else None
        # the layers' RotaryEmbeddings (shared between layers), told to forget before each forward
        self.rotaries = list(
            {id(m): m for m in self.layers.modules() if isinstance(m, RotaryEmbedding)}.values()
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate = None
    ) -> StageOutput:
        for rotary in self.rotaries:
            rotary.forget_positions()
        if self.is_first_stage:
            hidden_states, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                hidden_states = hidden_states * self.embed_scale
        else:
            hidden_states, residual = intermediate  # [T, hidden] each, from the previous stage
        for i in self.local_layers:
            hidden_states, residual = self.layers[i](positions, hidden_states, residual)
        if not self.is_last_stage:
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DecoderForCausalLM(nn.Module):
    """A decoder-only LM from a Hugging Face config; a family overrides build_model and the
    class attributes that describe its checkpoints.

    engine.loader.weights reads a checkpoint through the hooks declared here, each with the
    default that fits a plain decoder: packed_modules_mapping, ignored_checkpoint_tensors,
    tie_word_embeddings, checkpoint_name (checkpoint_prefixes), is_other_stage_weight,
    expert_tensor and expert_sources. has_attention_sinks and soft_caps_attention are read
    before loading (the runtime chooses the attention backend by them).
    """

    # HF tensor name component -> (our parameter, shard id for its weight_loader)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Checkpoint tensors the model does not use (regular expressions searched in the renamed
    # name); any other tensor the model lacks is an error, as is a parameter the checkpoint lacks.
    # rotary_emb.inv_freq (older checkpoints): recomputed from the config, never loaded.
    ignored_checkpoint_tensors: ClassVar[tuple[str, ...]] = (r"rotary_emb\.inv_freq$",)
    # Checkpoint name prefix -> ours, applied before anything else (multimodal wrappers)
    checkpoint_prefixes: ClassVar[dict[str, str]] = {}
    # Per-head attention sink logits (GPT-OSS): flash-attn cannot run them, so the runtime never
    # picks it for such a model (read from the class, before the model is built)
    has_attention_sinks: ClassVar[bool] = False
    # Tied (from the config): lm_head is embed_tokens' parameter; the checkpoint's lm_head.weight
    # is ignored
    tie_word_embeddings: bool

    @classmethod
    def soft_caps_attention(cls, config: dict) -> bool:
        """Whether a checkpoint with this config.json (its language model's fields) soft-caps its
        attention logits, which the CPU paged kernel cannot (Gemma 2 says yes)."""
        return False

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        config = config.get_text_config()  # a multimodal wrapper's language model
        self.config = config
        self.model = self.build_model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.lm_head = None
        if self.model.is_last_stage:
            shared = self.model.embed_tokens.weight if self.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, shared_weight=shared)

    def build_model(self, config: PretrainedConfig) -> DecoderModel:
        raise NotImplementedError

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Intermediate = None
    ) -> StageOutput:
        """input_ids, positions: [T] int64, sequences laid end to end -> hidden states [T, hidden].

        A pipeline stage after the first takes `intermediate` = [hidden, residual] from the
        previous stage instead of input_ids; a stage before the last returns (hidden, residual).
        """
        return self.model(input_ids, positions, intermediate)

    def is_other_stage_weight(self, name: str) -> bool:
        """A checkpoint tensor (renamed) that belongs to another pipeline stage (the loader skips it)."""
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            return int(parts[2]) not in self.model.local_layers
        if parts[:2] == ["model", "embed_tokens"]:
            return self.model.embed_tokens is None
        if parts[:2] == ["model", "norm"]:
            return self.model.norm is None
        return parts[0] == "lm_head" and self.lm_head is None

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name in this model's namespace (checkpoint_prefixes applied)."""
        for prefix, ours in self.checkpoint_prefixes.items():
            if name.startswith(prefix):
                return ours + name[len(prefix) :]
        return name

    def expert_tensor(self, name: str) -> tuple[str, object] | None:
        """A mixture-of-experts checkpoint tensor (renamed) -> (the stacked parameter it fills, its
        shard id); None for every other tensor, which maps by packed_modules_mapping (the default:
        no experts). Families with experts override it (engine.models.moe_checkpoint, GPT-OSS)."""
        return None

    def expert_sources(self, param_name: str) -> list[str] | None:
        """The checkpoint tensors a stacked expert parameter needs (to name the missing ones);
        None for every other parameter (the default: no experts)."""
        return None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, hidden] (only the rows that need logits) -> logits [N, vocab_size]."""
        logits = self.lm_head(hidden_states)
        cap = self.final_logit_softcapping
        if cap:  # Gemma: cap * tanh(logits / cap), as transformers computes it
            logits = torch.tanh(logits / cap) * cap
        return logits


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_embeddings(config: PretrainedConfig) -> dict[str | None, RotaryEmbedding]:
    """One RotaryEmbedding per layer type when the config gives each its own rope (Gemma 3's
    local and global layers), else one for every layer under the key None."""
    params = getattr(config, "rope_parameters", None) or {}
    layer_types = sorted(set(getattr(config, "layer_types", None) or []))
    per_type = [t for t in layer_types if isinstance(params.get(t), dict)]
    head_dim = head_dim_of(config)
    embeddings = {}
    for layer_type in per_type or [None]:
        rope = rope_parameters_from_config(config, layer_type)
        embeddings[layer_type] = RotaryEmbedding(head_dim, rope_context_len(rope), rope)
    return embeddings


def layer_rotary(
    rotaries: dict[str | None, RotaryEmbedding], config: PretrainedConfig, i: int
) -> RotaryEmbedding:
    """Layer i's RotaryEmbedding out of rotary_embeddings(config)."""
    if None in rotaries:
        return rotaries[None]
    return rotaries[config.layer_types[i]]


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window, None for full attention (transformers 5.24's rule)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        # Mistral, Phi-3: one window for every layer (None when the config disables it).
        return [window] * config.num_hidden_layers
    # Qwen2/3: the config derives layer_types from use_sliding_window and max_window_layers
    # (layers >= max_window_layers slide) and sets sliding_window None when it is off.
    # Gemma 2/3: layer_types alternate local (sliding) and global layers.
    return [window if layer_type == "sliding_attention" else None for layer_type in layer_types]
