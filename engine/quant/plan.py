"""Which quantisation a model gets, and the two steps that apply it around weight loading.

`make_plan` reads the engine config and the checkpoint's config.json contents, as rank 0 read
them once (a bitsandbytes `quantization_config` of a pre-quantised folder, the 2:4 marker of a
pruned one), and refuses what cannot run here; rank 0 makes the plan once and hands it down.
`prepare_model` runs before the weights load (pre-quantised layers take the checkpoint's
quantised tensors instead of a float weight); `finalize_model` runs after: each targeted
layer's method converts its loaded shard on the host, then the model moves to its device
(bitsandbytes quantises during that move).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine.kernels import triton_available
from engine.quant.base import UNQUANTIZED, LinearMethod
from engine.quant.bnb import Bnb4bitLinearMethod, BnbInt8LinearMethod, BnbPrequantizedLinearMethod
from engine.quant.experts import QuantizedExpertsMethod, is_moe_experts
from engine.quant.fp8 import Fp8LinearMethod, check_fp8_supported
from engine.quant.sparse24 import Sparse24LinearMethod
from engine.quant.w8a8 import (
    W8A8LinearMethod,
    choose_kernel,
    compressed_tensors_skip_modules,
    quantize_lm_head,
)

log = logging.getLogger(__name__)

SPARSITY_MARKER = "sluice_sparsity"  # config.json key written by engine.compress
# what a mixture-of-experts model's experts can be quantised with (fp8 on CUDA only, as for dense models)
MOE_MODES = ("int8", "nf4", "fp4", "fp8", "w8a8")


class QuantizationError(ValueError):
    """The requested quantisation cannot run with this checkpoint, device or layout."""


@dataclass(frozen=True)
class QuantPlan:
    mode: str = "none"  # one of engine.config.QUANTIZATION_MODES
    # the checkpoint's linear weights are quantised already: bitsandbytes (int8, nf4, fp4) or
    # compressed-tensors int8 (w8a8)
    prequantized: bool = False
    sparse24: bool = False  # the checkpoint is 2:4-pruned (engine.compress)
    int8_threshold: float = 6.0
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32  # 4-bit: dtype the dequantised weight multiplies in
    skip_modules: tuple[str, ...] = ()  # module names (or name parts) kept in float
    lm_head: bool = False  # w8a8: the LM head int8 too (EngineConfig.quantize_lm_head)
    device_type: str = "cpu"  # where the model runs ("cpu", "cuda"): w8a8 picks its kernel by it

    @property
    def is_active(self) -> bool:
        return self.mode != "none" or self.sparse24

    def make_method(self) -> LinearMethod:
        if self.mode == "w8a8":
            return W8A8LinearMethod(prequantized=self.prequantized, device_type=self.device_type)
        if self.prequantized:
            return BnbPrequantizedLinearMethod(self.mode, self.int8_threshold, self.compute_dtype)
        if self.mode == "int8":
            return BnbInt8LinearMethod(self.int8_threshold)
        if self.mode in ("nf4", "fp4"):
            return Bnb4bitLinearMethod(self.mode, self.double_quant, self.compute_dtype)
        if self.mode == "fp8":
            return Fp8LinearMethod()
        if self.sparse24:
            return Sparse24LinearMethod()
        return UNQUANTIZED


NO_QUANTIZATION = QuantPlan()


def make_plan(config, hf_config: dict, device: torch.device) -> QuantPlan:
    """The plan for `config` (an EngineConfig) on this checkpoint; QuantizationError if impossible."""
    model_dtype = getattr(torch, config.dtype)
    compute_dtype = getattr(torch, config.bnb_4bit_compute_dtype or config.dtype)
    checkpoint = hf_config.get("quantization_config")
    plan = QuantPlan(
        mode=config.quantization,
        sparse24=SPARSITY_MARKER in hf_config,
        int8_threshold=config.int8_threshold,
        double_quant=config.bnb_4bit_double_quant,
        compute_dtype=compute_dtype,
        skip_modules=tuple(config.quantization_skip_modules),
        lm_head=config.quantize_lm_head,
        device_type=device.type,
    )
    if plan.sparse24:  # layers the pruning tool left dense stay on the float path
        marker_skip = tuple(hf_config[SPARSITY_MARKER].get("skip_modules") or ())
        plan = replace(plan, skip_modules=plan.skip_modules + marker_skip)
    # MXFP4 (GPT-OSS's experts): the model keeps them packed or dequantises them (engine.models.gpt_oss)
    if checkpoint is not None and checkpoint.get("quant_method") != "mxfp4":
        plan = _prequantized_plan(plan, checkpoint, config.bnb_4bit_compute_dtype, model_dtype)
    if plan.mode == "fp8":
        try:
            check_fp8_supported(device)
        except ValueError as e:
            raise QuantizationError(str(e)) from None
    if plan.lm_head and plan.mode != "w8a8":
        raise QuantizationError(
            f"quantize_lm_head needs W8A8 (quantization 'w8a8' or a compressed-tensors W8A8 checkpoint); "
            f"the quantization here is {plan.mode!r}"
        )
    if plan.mode == "w8a8" and device.type not in ("cpu", "cuda"):
        raise QuantizationError(
            f"quantization 'w8a8' runs on the CPU (PyTorch's int8 GEMMs) or CUDA (Triton); device is {device.type!r}"
        )
    if plan.mode == "w8a8" and device.type == "cuda" and not triton_available():
        raise QuantizationError(
            "quantization 'w8a8' on CUDA runs Triton kernels, and triton does not import here"
        )
    return plan


def prepare_model(model: nn.Module, plan: QuantPlan) -> None:
    """Before loading: pre-quantised layers get their method, which replaces the float weight.
    A mixture-of-experts model takes bitsandbytes int8/nf4/fp4 or fp8 (its experts quantised per
    expert, engine.quant.experts); anything else for it is refused by name rather than left float."""
    if plan.is_active and any(is_moe_experts(m) for m in model.modules()):
        _check_moe_supported(model, plan)
    if not plan.prequantized:
        return
    for _, layer in _targets(model, plan):
        layer.quant_method = plan.make_method()
        try:
            layer.quant_method.create_weights(layer)
        except ValueError as e:  # e.g. more than one tensor-parallel rank
            raise QuantizationError(str(e)) from None


def checkpoint_tensor_claimers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers (by qualified name) whose method loads extra checkpoint tensors itself."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(getattr(m, "quant_method", None), "load_checkpoint_tensor")
    }


def claim_checkpoint_tensor(claimers: dict[str, nn.Module], param_name: str, shard_id, tensor_fn) -> bool:
    """Hand `param_name` (e.g. ...qkv_proj.weight.absmax) to the layer that claims it, if one does."""
    parts = param_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        layer = claimers.get(".".join(parts[:i]))
        if layer is not None:
            layer.quant_method.load_checkpoint_tensor(layer, ".".join(parts[i:]), shard_id, tensor_fn())
            return True
    return False


@torch.no_grad()
def finalize_model(
    model: nn.Module, plan: QuantPlan, device: torch.device, lm_heads: list[tuple[nn.Module, bool]] = ()
) -> None:
    """After loading (model on the host): convert each targeted layer (and with `plan.lm_head` each
    of `lm_heads`: (head, tied to the embedding's table)), then move the model to `device`."""
    targets = _targets(model, plan)
    for _, layer in targets:
        if layer.quant_method is UNQUANTIZED:
            layer.quant_method = plan.make_method()
        layer.quant_method.process_weights_after_loading(layer)
    for name, experts in _expert_targets(model, plan):
        _quantize_experts(name, experts, plan)
    if plan.lm_head:  # the loader finds the heads: layer classes are a floor above this one
        for head, tied in lm_heads:
            quantize_lm_head(head, tied, kernel=choose_kernel(plan.device_type))
    model.to(device)
    for _, layer in targets:
        on_device = getattr(layer.quant_method, "on_device", None)
        if on_device is not None:
            on_device(layer, device)
    _log_summary(targets, plan, model)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, linear layers counted as their method stores them (scales included)."""
    total, seen = 0, set()
    linear_prefixes = []
    for name, module in model.named_modules():
        if _is_linear(module):  # quantised experts' ExpertLinear layers included
            total += module.quant_method.weight_bytes(module)
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
            linear_prefixes.append(name + ".")
    for name, param in model.named_parameters():
        if id(param) in seen or any(name.startswith(p) for p in linear_prefixes):
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    return total


def _check_moe_supported(model: nn.Module, plan: QuantPlan) -> None:
    if plan.mode in MOE_MODES and not plan.prequantized and not plan.sparse24:
        return
    if plan.prequantized and plan.mode == "w8a8":
        what = "a compressed-tensors W8A8 checkpoint"
    elif plan.prequantized:
        what = f"a pre-quantised bitsandbytes ({plan.mode}) checkpoint"
    elif plan.sparse24:
        what = "a 2:4-pruned checkpoint"
    else:
        what = f"quantization {plan.mode!r}"
    raise QuantizationError(
        f"{what} is not supported for mixture-of-experts models ({type(model).__name__}): its experts "
        f"can be quantised at load time (from a float checkpoint) with {', '.join(MOE_MODES)} only"
    )


def _quantize_experts(name: str, experts: nn.Module, plan: QuantPlan) -> None:
    try:
        QuantizedExpertsMethod(plan.make_method()).process_weights_after_loading(experts)
    except ValueError as e:  # e.g. fp8's sizes that are not multiples of 16
        raise QuantizationError(
            f"{name}: {e} (these experts: {name!r}; every MoE layer's: 'experts')"
        ) from None


def _expert_targets(model: nn.Module, plan: QuantPlan) -> list[tuple[str, nn.Module]]:
    """Every FusedMoE not skipped (by the same name matching as linear layers), float until now."""
    if plan.mode not in MOE_MODES:
        return []
    skip = set(plan.skip_modules)
    return [
        (name, m)
        for name, m in model.named_modules()
        if is_moe_experts(m) and m.quant_method is None and not any(f".{s}." in f".{name}." for s in skip)
    ]


def _targets(model: nn.Module, plan: QuantPlan) -> list[tuple[str, nn.Module]]:
    """Every linear layer not skipped; the embedding and lm_head are not linear layers and never targets."""
    if not plan.is_active:
        return []
    mapping = getattr(model, "packed_modules_mapping", {})
    skip = {_packed_name(s, mapping) for s in plan.skip_modules}
    return [
        (name, m)
        for name, m in model.named_modules()
        if _is_linear(m)
        and not getattr(m, "is_router", False)  # an MoE router stays float
        and not any(f".{s}." in f".{name}." for s in skip)
    ]


def _packed_name(name: str, mapping: dict) -> str:
    """A checkpoint's module name as the model names it: q_proj -> qkv_proj, also inside a dotted name."""
    prefix, _, last = name.rpartition(".")
    if last not in mapping:
        return name
    return f"{prefix}.{mapping[last][0]}" if prefix else mapping[last][0]


def _is_linear(module: nn.Module) -> bool:
    # a linear layer (engine.layers.linear) is a module whose matmul a LinearMethod runs; asked
    # this way, quant never imports the layers, which import quant's interface
    return isinstance(getattr(module, "quant_method", None), LinearMethod)


def _prequantized_plan(plan: QuantPlan, checkpoint: dict, compute_dtype_option, model_dtype) -> QuantPlan:
    method = checkpoint.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_plan(plan, checkpoint)
    if method != "bitsandbytes":
        raise QuantizationError(
            f"the checkpoint is quantised with {method!r}; only bitsandbytes and compressed-tensors "
            "(W8A8 int8) checkpoints load pre-quantised"
        )
    if checkpoint.get("load_in_8bit"):
        mode = "int8"
    elif checkpoint.get("load_in_4bit"):
        mode = checkpoint.get("bnb_4bit_quant_type", "fp4")
    else:
        raise QuantizationError("the checkpoint's bitsandbytes quantization_config sets neither 8 nor 4 bits")
    if plan.mode not in ("none", mode):
        raise QuantizationError(
            f"quantization {plan.mode!r} was asked for, but the checkpoint is already quantised as {mode!r}; "
            f"leave quantization 'none' (or set {mode!r}) to load it as it is"
        )
    if plan.sparse24:
        raise QuantizationError("a checkpoint cannot be both pre-quantised and marked 2:4-pruned")
    checkpoint_compute = checkpoint.get("bnb_4bit_compute_dtype")
    compute_dtype = getattr(
        torch, compute_dtype_option or checkpoint_compute or str(model_dtype).removeprefix("torch.")
    )
    skip = tuple(checkpoint.get("llm_int8_skip_modules") or ()) + plan.skip_modules
    return QuantPlan(
        mode=mode,
        prequantized=True,
        int8_threshold=float(checkpoint.get("llm_int8_threshold", plan.int8_threshold)),
        double_quant=bool(checkpoint.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=compute_dtype,
        skip_modules=skip,
    )


def _compressed_tensors_plan(plan: QuantPlan, checkpoint: dict) -> QuantPlan:
    if plan.mode not in ("none", "w8a8"):
        raise QuantizationError(
            f"quantization {plan.mode!r} was asked for, but the checkpoint is a compressed-tensors W8A8 "
            "checkpoint; leave quantization 'none' (or set 'w8a8') to load it as it is"
        )
    if plan.sparse24:
        raise QuantizationError("a checkpoint cannot be both pre-quantised and marked 2:4-pruned")
    try:
        skip = compressed_tensors_skip_modules(checkpoint)
    except ValueError as e:
        raise QuantizationError(f"compressed-tensors checkpoint: {e}") from None
    return replace(plan, mode="w8a8", prequantized=True, skip_modules=plan.skip_modules + skip)


def _log_summary(targets, plan: QuantPlan, model: nn.Module) -> None:
    counts: dict[str, int] = {}
    for _, layer in targets:
        key = layer.quant_method.name
        if key == "sparse24":
            key = "2:4 sparse kernels" if layer.is_sparse24 else "2:4 pruned, dense kernels"
        counts[key] = counts.get(key, 0) + 1
    reasons = {getattr(layer, "sparse24_dense_reason", None) for _, layer in targets} - {None}
    log.info(
        "weights: %s%s; %.1f MiB",
        ", ".join(f"{n} linear layers {k}" for k, n in counts.items()),
        f" ({'; '.join(sorted(reasons))})" if reasons else "",
        model_weight_bytes(model) / 2**20,
    )
