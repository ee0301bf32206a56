"""GPT-OSS: attention sinks, alternating sliding-window layers, YaRN, and top-4 MoE MLPs.

What sets it apart: attention biases and a learned sink logit per head (engine.layers.attention);
`layer_types` alternating local (sliding_window) and global layers; a router with a bias whose
top-k logits are softmaxed; experts with biases and a clamped SwiGLU
((up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit).

Checkpoint layout (Transformers 5.24): the router is `mlp.router`; the experts are stacked,
gate_up_proj [E, H, 2I] with gate and up interleaved by column, down_proj [E, I, H]. Real
checkpoints store both as MXFP4 (`*_blocks` [E, out, in / 32, 16], `*_scales` [E, out, in / 32];
quantization_config quant_method "mxfp4"). Where the Triton MoE kernel runs on the device the
model is built on (CUDA; CPU only under Triton's interpreter) they stay packed, as vLLM's
Mxfp4MoEMethod keeps them, and the kernel dequantises each tile (engine.kernels.triton_moe);
elsewhere, or when a tensor-parallel rank's share of the intermediate size is not a multiple
of 32 (its down_proj shard would split a block: vLLM pads there, we do not), they are
dequantised at load (engine.quant.mxfp4) into the model's dtype. The log says which.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.linear import _copy_shard
from engine.layers.moe import FusedMoE, SparseMoeBlock, triton_kernel_runs_on
from engine.layers.rotary import RotaryEmbedding
from engine.layers.tp import get_tp_size, is_expert_parallel
from engine.models.base import DecoderAttention
from engine.models.llama import LlamaForCausalLM
from engine.quant import mxfp4

log = logging.getLogger(__name__)

_GATE_UP_WEIGHTS = ("gate_up_proj", "gate_up_proj_bias", "gate_up_proj_blocks", "gate_up_proj_scales")
_MXFP4_TENSOR = re.compile(r"^(?P<param>.*\.experts\.(gate_up_proj|down_proj))_(?P<part>blocks|scales)$")


class SinkAttention(DecoderAttention):
    """DecoderAttention with GPT-OSS's per-head sink logits (`sinks`, split by head across ranks)."""

    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int | None):
        bias = bool(config.attention_bias)
        super().__init__(config, rotary, sliding_window=sliding_window, qkv_bias=bias, o_bias=bias)
        self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
        self.sinks.weight_loader = self._load_sinks
        self.attn.sinks = self.sinks  # the same parameter: loaded once, as self_attn.sinks

    def _load_sinks(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        rank, size = self.qkv_proj.tp_rank, self.qkv_proj.tp_size
        _copy_shard(param.data, loaded_weight, dim=0, index=rank, num_shards=size)


class GptOssExperts(FusedMoE):
    """FusedMoE reading GPT-OSS's layout (transposed, gate/up interleaved; or MXFP4)."""

    def __init__(self, config: PretrainedConfig, packed: bool = False):
        activation = functools.partial(clamped_swiglu, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        num_experts, hidden, intermediate = (
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
        )
        super().__init__(num_experts, hidden, intermediate, activation, bias=True, mxfp4=packed)
        self._packed: dict[tuple[str, str], torch.Tensor] = {}  # MXFP4 halves waiting for each other

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id in ("blocks", "scales"):
            self._load_mxfp4(param, _whole(loaded_weight), shard_id)
            return
        loaded = _whole(loaded_weight)
        if param is self.gate_up_proj or param is self.down_proj:
            _check_dims(loaded, 3)
            loaded = loaded.transpose(1, 2)  # [E, in, out] -> [E, out, in]
        elif param.dtype == torch.uint8 and loaded.dtype != torch.uint8:  # kept packed
            raise ValueError(f"is {loaded.dtype}, expected uint8 (MXFP4 blocks and scales)")
        elif param is self.gate_up_proj_bias:
            _check_dims(loaded, 2)
        if any(param is getattr(self, name, None) for name in _GATE_UP_WEIGHTS):
            loaded = _deinterleave(loaded)  # packed or float: gate and up rows alternate
        super().weight_loader(param, loaded)

    def _load_mxfp4(self, param: nn.Parameter, loaded: torch.Tensor, part: str) -> None:
        which = "gate_up_proj" if param is self.gate_up_proj else "down_proj"
        self._packed[(which, part)] = loaded
        if (which, "blocks") not in self._packed or (which, "scales") not in self._packed:
            return
        blocks, scales = self._packed.pop((which, "blocks")), self._packed.pop((which, "scales"))
        weight = mxfp4.dequantize(blocks, scales)  # [E, out, in]: our orientation already
        super().weight_loader(param, _deinterleave(weight) if which == "gate_up_proj" else weight)


class GptOssForCausalLM(LlamaForCausalLM):
    has_attention_sinks: ClassVar[bool] = True  # attention_backend "auto" never picks flash for it

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        if self.is_mxfp4:
            _log_mxfp4_layout(self, *self.mxfp4_layout)

    def make_attention(
        self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int | None
    ) -> DecoderAttention:
        return SinkAttention(config, rotary, sliding_window)

    def make_mlp(self, config: PretrainedConfig, layer_index: int) -> nn.Module:
        return SparseMoeBlock(
            GptOssExperts(config, packed=self.is_mxfp4 and self.mxfp4_layout[0]),
            config.num_experts_per_tok,
            config.hidden_size,
            renormalize=False,
            softmax_after_top_k=True,
            router_bias=True,
        )

    def checkpoint_name(self, name: str) -> str:
        return super().checkpoint_name(name).replace(".mlp.router.", ".mlp.gate.")

    def expert_tensor(self, name: str) -> tuple[str, str] | None:
        """An MXFP4 half (`...experts.down_proj_blocks`) -> (its parameter, "blocks" / "scales")
        when it is dequantised at load; kept packed, it fills its own parameter (None)."""
        match = _MXFP4_TENSOR.match(name)
        if match is None or (self.is_mxfp4 and self.mxfp4_layout[0]):  # packed: a parameter's own
            return None
        return match["param"], match["part"]

    def expert_sources(self, param_name: str) -> list[str] | None:
        if not re.search(r"\.experts\.(gate_up_proj|down_proj)$", param_name):
            return None
        # named as is: gate_up_proj is not the packed_modules_mapping's fusion of gate and up
        return [f"{param_name}_blocks", f"{param_name}_scales"] if self.is_mxfp4 else [param_name]

    @property
    def is_mxfp4(self) -> bool:
        quantization = getattr(self.config, "quantization_config", None) or {}
        return quantization.get("quant_method") == "mxfp4"

    @functools.cached_property
    def mxfp4_layout(self) -> tuple[bool, str]:
        """(keep MXFP4 experts packed, why): decided once, for the device the model is built on
        (build_model's: the target device, or the host when a quantisation plan converts there)."""
        return mxfp4_layout(self.config, torch.get_default_device())


def mxfp4_layout(config: PretrainedConfig, device: torch.device) -> tuple[bool, str]:
    """Whether GPT-OSS's MXFP4 experts stay packed on `device` under this process's parallel
    layout, and why (or why not)."""
    if not triton_kernel_runs_on(device):
        return False, f"the Triton MoE kernel does not run on {device.type}"
    shards = 1 if is_expert_parallel() else get_tp_size()
    size = config.intermediate_size // shards
    if size % mxfp4.BLOCK or config.hidden_size % mxfp4.BLOCK:
        return False, (
            f"a tensor-parallel rank's share of the intermediate size ({size}) is not a multiple "
            f"of {mxfp4.BLOCK}: its down_proj shard would split an MXFP4 block"
        )
    return True, f"for the Triton MoE kernel on {device}"


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """[N, 2I] = [gate | up] -> (up + 1) * gate * sigmoid(alpha * gate), clamped (GptOssExperts)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] with gate and up rows alternating -> [E, [gate; up], ...]."""
    return torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def _log_mxfp4_layout(model: nn.Module, packed: bool, why: str) -> None:
    experts = [m for m in model.modules() if isinstance(m, GptOssExperts)]
    weight_bytes = sum(
        p.numel() * p.element_size()
        for m in experts
        for n, p in m.named_parameters()
        if not n.endswith("_bias")
    )
    how = "kept packed (uint8 blocks + e8m0 scales, 4.25 bits a weight)" if packed else "dequantised at load"
    log.info("MXFP4 experts of %d layers %s, %s: %.2f MiB", len(experts), how, why, weight_bytes / 2**20)


def _whole(loaded_weight) -> torch.Tensor:
    # tensor parallel hands a lazy slice (engine.loader.weights): GPT-OSS's layouts need the whole tensor
    return (
        loaded_weight
        if isinstance(loaded_weight, torch.Tensor)
        else loaded_weight.narrow(0, 0, loaded_weight.shape[0])
    )


def _check_dims(loaded: torch.Tensor, dims: int) -> None:
    if loaded.dim() != dims:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {dims} dimensions")


ARCHITECTURES = {"GptOssForCausalLM": GptOssForCausalLM}
