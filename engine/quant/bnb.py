"""bitsandbytes weights: LLM.int8 (`Linear8bitLt`) and 4-bit NF4/FP4 (`Linear4bit`), CPU and CUDA.

The layer's loaded float weight (its tensor-parallel shard) becomes the weight of a
bitsandbytes module held by the layer (`layer.bnb_linear`, no bias: RowParallelLinear adds the
bias on rank 0 only). bitsandbytes quantises when that module moves to its device, which is
the model's `.to(device)` right after processing: on CUDA with its CUDA kernels, on CPU with
its CPU backend (int8 matmul through torch._int_mm on AVX-512 CPUs; 4-bit dequantises to the
compute dtype and calls F.linear, or runs its fused AVX512-BF16 kernel, which computes in
bfloat16 whatever the input, so we allow it only when the compute dtype is bfloat16).

Pre-quantised checkpoints (saved by transformers with a bitsandbytes quantization_config)
hold each projection's quantised tensors separately (q_proj, k_proj, v_proj, gate_proj,
up_proj); a fused layer then keeps one bitsandbytes module per projection and concatenates
their outputs, so no tensor is re-quantised or re-packed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.quant.base import LinearMethod, _tensor_bytes

# Tensor-name suffixes after the projection's name, as bitsandbytes' state dicts write them.
INT8_SUFFIXES = ("weight", "SCB", "weight_format")
FOUR_BIT_REQUIRED = ("weight", "weight.absmax", "weight.quant_map")


class BnbInt8LinearMethod(LinearMethod):
    name = "int8"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold  # activation columns above it run in float (LLM.int8 outliers)
        _quiet_int8_cast_warning()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        import bitsandbytes as bnb

        out_features, in_features = layer.weight.shape
        module = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=False,
            has_fp16_weights=False,
            threshold=self.threshold,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
        _replace_weight(layer, module)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _add_bias(layer.bnb_linear(x), bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        return _int8_bytes(layer.bnb_linear)


class Bnb4bitLinearMethod(LinearMethod):
    def __init__(self, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> None:
        self.name = quant_type  # "nf4" or "fp4"
        self.quant_type = quant_type
        self.double_quant = double_quant  # quantise the per-block absmax constants too (QLoRA)
        self.compute_dtype = compute_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        import bitsandbytes as bnb

        out_features, in_features = layer.weight.shape
        module = _linear4bit(
            in_features, out_features, self.quant_type, self.double_quant, self.compute_dtype
        )
        module.weight = bnb.nn.Params4bit(
            layer.weight.data,
            requires_grad=False,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            module=module,
        )
        _replace_weight(layer, module)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _add_bias(layer.bnb_linear(x), bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        return _four_bit_bytes(layer.bnb_linear)


class BnbPrequantizedLinearMethod(LinearMethod):
    """A layer whose checkpoint tensors are already bitsandbytes-quantised: loaded as they are."""

    def __init__(self, mode: str, threshold: float, compute_dtype: torch.dtype) -> None:
        self.name = mode  # "int8", "nf4" or "fp4"
        self.threshold = threshold
        self.compute_dtype = compute_dtype
        _quiet_int8_cast_warning()

    def create_weights(self, layer: nn.Module) -> None:
        if layer.tp_size > 1:
            raise ValueError(
                "a pre-quantised bitsandbytes checkpoint cannot be split across tensor-parallel ranks "
                "(its packed 4-bit blocks and row scales are per whole projection); load the float "
                "checkpoint with quantization set instead, which quantises each rank's shard"
            )
        layer.bnb_rows = layer.output_shards  # shard id -> output rows, in the fused order
        layer.bnb_in_features = layer.weight.shape[1]
        layer.bnb_checkpoint = {shard: {} for shard in layer.bnb_rows}
        del layer.weight  # the float placeholder: the checkpoint's tensors go to bnb_checkpoint
        layer.register_parameter("weight", None)

    def load_checkpoint_tensor(self, layer: nn.Module, suffix: str, shard_id, tensor: torch.Tensor) -> None:
        if shard_id is None and None not in layer.bnb_rows and not any(layer.bnb_checkpoint.values()):
            # the checkpoint holds the fused projection as one tensor (Phi-3's qkv_proj): one module
            layer.bnb_rows = {None: sum(layer.bnb_rows.values())}
            layer.bnb_checkpoint = {None: {}}
        if shard_id not in layer.bnb_checkpoint:
            raise ValueError(f"has no place in this layer (shard {shard_id!r})")
        layer.bnb_checkpoint[shard_id][suffix] = tensor

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        modules = [self._module(layer, shard, rows) for shard, rows in layer.bnb_rows.items()]
        del layer.bnb_checkpoint
        layer.bnb_shards = nn.ModuleList(modules)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.cat([m(x) for m in layer.bnb_shards], dim=-1) if len(layer.bnb_shards) > 1 else None
        return _add_bias(layer.bnb_shards[0](x) if y is None else y, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        count = _int8_bytes if self.name == "int8" else _four_bit_bytes
        return sum(count(m) for m in layer.bnb_shards)

    def _module(self, layer: nn.Module, shard, rows: int) -> nn.Module:
        tensors = layer.bnb_checkpoint[shard]
        what = "projection" if shard is None else f"projection {shard!r}"
        if self.name == "int8":
            return _prequantized_int8(tensors, rows, layer.bnb_in_features, self.threshold, what)
        return _prequantized_4bit(tensors, rows, layer.bnb_in_features, self.name, self.compute_dtype, what)


def _prequantized_int8(tensors: dict, rows: int, cols: int, threshold: float, what: str) -> nn.Module:
    import bitsandbytes as bnb

    _require(tensors, ("weight", "SCB"), what)
    weight, scb = tensors["weight"], tensors["SCB"]
    if weight.dtype != torch.int8 or tuple(weight.shape) != (rows, cols) or tuple(scb.shape) != (rows,):
        raise ValueError(
            f"{what}: int8 weight {tuple(weight.shape)} {weight.dtype} and SCB {tuple(scb.shape)} "
            f"do not fit a [{rows}, {cols}] projection"
        )
    module = bnb.nn.Linear8bitLt(
        cols, rows, bias=False, has_fp16_weights=False, threshold=threshold, device="meta"
    )
    module.weight = bnb.nn.Int8Params(
        weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb.float()
    )
    return module


def _prequantized_4bit(
    tensors: dict, rows: int, cols: int, quant_type: str, compute_dtype: torch.dtype, what: str
) -> nn.Module:
    import bitsandbytes as bnb

    state_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    _require(tensors, (*FOUR_BIT_REQUIRED, state_key), what)
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False, device="cpu")
    if tuple(weight.quant_state.shape) != (rows, cols):
        raise ValueError(
            f"{what}: quantised shape {tuple(weight.quant_state.shape)}, expected ({rows}, {cols})"
        )
    module = _linear4bit(cols, rows, quant_type, weight.quant_state.nested, compute_dtype)
    weight.module = module
    module.weight = weight
    module.quant_state = weight.quant_state
    return module


def _linear4bit(in_features: int, out_features: int, quant_type: str, double_quant: bool, compute_dtype):
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    # bitsandbytes' fused AVX512-BF16 CPU kernel computes in bfloat16 whatever compute_dtype says.
    module.support_avx512bf16_for_cpu = module.support_avx512bf16_for_cpu and compute_dtype == torch.bfloat16
    return module


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    # LLM.int8 always quantises activations from float16 (documented in docs/engine.md); bitsandbytes
    # logs that at WARNING on every matmul of a float32/bfloat16 model, which would flood the logs.
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastWarning())


def _replace_weight(layer: nn.Module, module: nn.Module) -> None:
    del layer.weight
    layer.register_parameter("weight", None)
    layer.bnb_linear = module.eval()


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _int8_bytes(module: nn.Module) -> int:
    weight = module.weight
    scb = weight.SCB if weight.SCB is not None else module.state.SCB
    return _tensor_bytes(weight.data, scb)


def _four_bit_bytes(module: nn.Module) -> int:
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return _tensor_bytes(*tensors)


def _require(tensors: dict, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{what}: the pre-quantised checkpoint lacks {', '.join(missing)}")
