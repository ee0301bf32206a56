"""W8A8 int8: int8 weights per output channel, int8 activations per token, int32 sums (CPU).

y[t, n] = s_x[t] * s_w[n] * sum_k x_q[t, k] * w_q[n, k] + b[n], where
  w_q = round(W / s_w), s_w[n] = max_k |W[n, k]| / 127 (symmetric, once, at load or from a
  compressed-tensors checkpoint's `weight_scale`), and
  x_q = round(x * (A / amax_t)), s_x[t] = amax_t / A, amax_t = max_k |x[t, k]| (dynamic, per token,
  at every matmul: one pass for the absolute maximum, one that scales; the kernel rounds).
The int32 sums are exact; only the final float products round.

Where the CPU has VNNI (vpdpbusd adds u8 x s8 products straight into int32) weights and
activations both use codes in [-127, 127]. Without it (AVX2, AVX-512 without VNNI) the u8 x s8
instruction (vpmaddubsw) adds two products into a saturating int16: with activations offset to
u8 (0..255) the weights may reach +-64, or with full-range weights the activations +-63
(PyTorch's fbgemm `reduce_range`). So on such CPUs a float checkpoint quantised here gets
weight codes in [-63, 63] and 8-bit activations (W7A8: on the trained checkpoint its greedy
agreement with float32 was 0.98 against W8A7's 0.96, loadtest/RESULTS.md), and a
compressed-tensors checkpoint's full-range codes get activations in [-63, 63]. Each layer's A
follows from its own codes (`activation_max`); both are stored int8.

Kernels (`KERNELS`; the engine picks one at start-up, `choose_kernel`, and logs it):
  fbgemm   the weight prepacked once by `torch.ops.quantized.linear_prepack` (fbgemm's blocked
           int8 layout with its column offsets); each call hands it the scaled activations with
           scale 1 and zero point A + 1, so fbgemm's own quantisation step is the rounding, and
           `quantized.linear_with_input_q_dq_qweight_dq_output_fp32` returns s_w-scaled float32
           sums; the per-token scale and the bias are applied in one more pass (addcmul).
  onednn   the weight prepacked by `torch.ops.onednn.qlinear_prepack`, int8 activations through
           `torch.ops.onednn.qlinear_pointwise` (float32 out), as Inductor's x86 quantizer lowers
           a quantised linear. On this project's AVX2 machine it was slower than fbgemm at every
           size measured and saturates (loadtest/bench_int8_gemm.py, loadtest/RESULTS.md), so it
           is chosen only where the CPU has AMX (not measured: no AMX machine was at hand;
           test_w8a8's saturation test checks whichever kernel a machine chooses).
  reference  the codes multiplied as float32 (exact while K * 127 * 127 < 2**24, else float32
           sums): never chosen by the engine; measures A = 127's quality where no exact int8
           kernel has it (loadtest/bench_quant.py's "w8a8 A=127" row).
  triton   CUDA: engine.kernels.triton_w8a8, the activations quantised per token by one kernel
           and multiplied by another on the int8 tensor cores (int32 sums, scales and bias in its
           epilogue, output in the activation's dtype); B = A = 127. The weight's codes and scales
           are the packed weight, moved to the GPU with the model (`on_device`). Tested under
           Triton's interpreter; not yet run on a GPU.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import nn

from engine.kernels import cpu_kernels
from engine.quant.base import LinearMethod, _tensor_bytes

log = logging.getLogger(__name__)

WEIGHT_MAX = 127  # symmetric int8 weights: codes in [-127, 127]
KERNELS = ("fbgemm", "onednn", "reference", "triton")
# projections the engine fuses into one layer: a checkpoint quantises all of a group or none
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_MIN_AMAX = 1e-12  # an all-zero row or token still gets a finite scale
_INF = float("inf")


def quantize_weight(weight: torch.Tensor, weight_max: int = WEIGHT_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (w_q [N, K] int8 in [-weight_max, weight_max], s_w [N] float32),
    symmetric per output channel."""
    w = weight.detach().float()
    scale = torch.linalg.vector_norm(w, _INF, dim=1).clamp(min=_MIN_AMAX) / weight_max
    w_q = torch.round(w / scale[:, None]).clamp(-weight_max, weight_max).to(torch.int8)
    return w_q, scale


def has_vnni_products(kernel: str) -> bool:
    """Whether `kernel` sums u8 x s8 products without an int16 step on this CPU."""
    return kernel in ("onednn", "reference", "triton") or bool(torch.cpu._is_vnni_supported())


def weight_max(kernel: str) -> int:
    """The largest weight code for weights quantised at load: 127, or 63 where the CPU has no VNNI
    (so the activations keep 8 bits)."""
    return WEIGHT_MAX if has_vnni_products(kernel) else 63


def activation_max(kernel: str, largest_weight_code: int = WEIGHT_MAX) -> int:
    """The largest activation code `kernel` multiplies exactly by weights whose codes reach
    `largest_weight_code`: without VNNI, 255 (an activation offset to u8) x 64 x 2 is the most an
    int16 pair sum holds."""
    if has_vnni_products(kernel) or largest_weight_code <= 64:
        return 127
    return 63


def quantize_per_token(x: torch.Tensor, act_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 -> (x_q [T, K] float32 holding integers in [-A, A], s_x [T, 1] float32).
    The reference of what the kernels compute (they round inside); tests and the float64 check use it."""
    amax = row_absmax(x).clamp(min=_MIN_AMAX)
    return torch.round(x * (act_max / amax)), amax / act_max


def scale_rows(x: torch.Tensor, act_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * (act_max / amax), amax [T, 1]) for x [T, K] float32, amax the rows' absolute maxima
    (at least _MIN_AMAX): one C++ pass per row where the CPU kernels are loaded (the engine loads
    them at start-up unless cpu_fused_ops and the paged attention are both off), the same values
    as the eager ops otherwise."""
    if x.is_cpu and x.dtype == torch.float32 and x.stride(-1) == 1 and cpu_kernels.is_loaded():
        return torch.ops.sluice_cpu.scale_rows(x, float(act_max), _MIN_AMAX)
    amax = row_absmax(x).clamp_(min=_MIN_AMAX)
    return x * (act_max / amax), amax


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max_k |x[t, k]| -> [T, 1]. abs() then amax(): ~10x faster on the CPU than the same value
    through linalg.vector_norm(x, inf), which took 8% of a W8A8 run (loadtest/RESULTS.md)."""
    return x.abs().amax(dim=-1, keepdim=True)


@functools.cache
def choose_kernel(device_type: str = "cpu") -> str:
    """The int8 GEMM to run: on CUDA the Triton kernels; on the CPU the one it runs fastest
    (measured: loadtest/bench_int8_gemm.py). Logged once."""
    if device_type == "cuda":
        log.info("w8a8: int8 GEMM triton (tensor cores; weights and activations in [-127, 127])")
        return "triton"
    kernel = "onednn" if torch.cpu._is_amx_tile_supported() else "fbgemm"
    log.info(
        "w8a8: int8 GEMM %s (%s; weights quantised at load: codes in [-%d, %d], activations [-%d, %d]; "
        "a checkpoint's full-range weights: activations [-%d, %d])",
        kernel,
        "AMX" if kernel == "onednn" else ("VNNI" if torch.cpu._is_vnni_supported() else "no VNNI"),
        *(weight_max(kernel),) * 2,
        *(activation_max(kernel, weight_max(kernel)),) * 2,
        *(activation_max(kernel),) * 2,
    )
    return kernel


def prepare(kernel: str, w_q: torch.Tensor, w_scale: torch.Tensor):
    """The kernel's packed weight (once, at load): w_q [N, K] int8, w_scale [N] float32."""
    if kernel == "fbgemm":
        zero_points = torch.zeros(w_q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack takes one
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)
    if kernel == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(w_q, None)
        return packed, w_scale.float().contiguous(), torch.zeros(w_q.shape[0], dtype=torch.long)
    if kernel == "reference":
        return w_q.float().t().contiguous(), w_scale.float()
    if kernel == "triton":  # the codes and scales as they are (on_device: the GPU's copies)
        return w_q, w_scale.float()
    raise ValueError(f"unknown w8a8 kernel {kernel!r}; one of {KERNELS}")


def linear(
    kernel: str,
    packed,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    act_max: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y = x W^T + b for x [T, K] through `kernel`'s packed weight -> [T, N] in `out_dtype`.
    The CPU kernels compute in float32 (x is converted); Triton reads x and writes y as they are."""
    act_max = act_max or activation_max(kernel)
    if kernel == "triton":
        return _triton_int8_linear()(x, *packed, bias, act_max, out_dtype=out_dtype)
    return _cpu_linear(kernel, packed, x.float(), bias, act_max).to(out_dtype)


@functools.cache
def _triton_int8_linear():
    """engine.kernels.triton_w8a8.int8_linear, imported on first use: importing Triton costs
    start-up time that CPU engines never need."""
    from engine.kernels.triton_w8a8 import int8_linear

    return int8_linear


def _cpu_linear(
    kernel: str, packed, x: torch.Tensor, bias: torch.Tensor | None, act_max: int
) -> torch.Tensor:
    if kernel == "fbgemm":
        scaled, amax = scale_rows(x, act_max)
        # fbgemm rounds x * (A / amax) (scale 1) and offsets it by its zero point to u8 in [1, 2A + 1]
        sums = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            scaled, 1.0, act_max + 1, packed
        )  # [T, N]: s_w * sum(x_q * w_q)
    elif kernel == "reference":
        amax = row_absmax(x).clamp_(min=_MIN_AMAX)  # [T, 1]
        codes_t, w_scale = packed
        sums = torch.round(x * (act_max / amax)) @ codes_t * w_scale
    else:
        amax = row_absmax(x).clamp_(min=_MIN_AMAX)  # [T, 1]
        weight, w_scale, w_zero = packed
        x_q = torch.round(x * (act_max / amax)).to(torch.int8)
        sums = torch.ops.onednn.qlinear_pointwise(
            x_q, 1.0, 0, weight, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], ""
        )
    x_scale = amax / act_max
    if bias is None:
        return sums.mul_(x_scale)
    return torch.addcmul(bias.float(), sums, x_scale)


def quantize_lm_head(head: nn.Module, tied: bool, kernel: str | None = None) -> None:
    """The LM head in W8A8 too (EngineConfig.quantize_lm_head): its weight [vocab, hidden] int8 per
    vocabulary row, its `matmul` the int8 GEMM with per-token activations, as every projection's.
    A tied head's float weight stays (the embedding's lookup reads it); an untied one's is dropped.
    Why: a decode step reads the whole head, a quarter of `small`'s weights, and in float32 it was
    the largest single matmul left after the projections went int8 (loadtest/RESULTS.md)."""
    kernel = kernel or choose_kernel()
    w_q, w_scale = quantize_weight(head.weight.data, weight_max(kernel))
    if not tied:
        del head.weight
        head.register_parameter("weight", None)
    head.weight_int8 = nn.Parameter(w_q, requires_grad=False)  # [vocab (this rank's), hidden]
    head.weight_scale = nn.Parameter(w_scale, requires_grad=False)  # [vocab]
    packed = prepare(kernel, w_q, w_scale)
    head.matmul = functools.partial(
        _head_matmul, kernel, packed, activation_max(kernel, int(w_q.abs().max()))
    )


def _head_matmul(kernel: str, packed, act_max: int, x: torch.Tensor) -> torch.Tensor:
    return linear(kernel, packed, x, None, act_max, out_dtype=x.dtype)


class W8A8LinearMethod(LinearMethod):
    """int8 weights per output channel, int8 activations per token, int32 sums (module docstring).

    From a float checkpoint the loaded weight is quantised here; from a compressed-tensors one
    (`prequantized`) the layer loads the int8 `weight` and its `weight_scale` as they are
    (each rank its shard, through the layer's own weight_loader)."""

    name = "w8a8"

    def __init__(
        self, prequantized: bool = False, kernel: str | None = None, device_type: str = "cpu"
    ) -> None:
        self.prequantized = prequantized
        self.kernel = kernel or choose_kernel(device_type)
        self.weight_max = weight_max(self.kernel)  # codes of weights quantised here

    def create_weights(self, layer: nn.Module) -> None:
        out_features, in_features = layer.weight.shape
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        weight.weight_loader = layer.weight_loader
        layer.weight = weight
        scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        scale.weight_loader = functools.partial(_load_scale, layer.weight_loader)
        layer.weight_scale = scale

    def load_checkpoint_tensor(self, layer: nn.Module, name: str, shard_id, tensor: torch.Tensor) -> None:
        """compressed-tensors may save a symmetric weight's zero points: all zero, nothing to keep."""
        if name != "weight_zero_point" or not self.prequantized:
            raise ValueError(f"is not a tensor of a W8A8 layer ({name})")
        if tensor.count_nonzero().item():
            raise ValueError("has non-zero zero points: only symmetric int8 weights load")

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device | None = None) -> None:
        if layer.weight.dtype == torch.int8:  # a compressed-tensors checkpoint's
            w_q, w_scale = layer.weight.data, layer.weight_scale.data
            if w_q.min().item() < -WEIGHT_MAX:
                raise ValueError("holds int8 weights of -128: symmetric int8 weights lie in [-127, 127]")
        else:  # a float weight: quantise it here
            w_q, w_scale = quantize_weight(layer.weight.data, self.weight_max)
        del layer.weight
        layer.register_parameter("weight", None)
        layer.weight_int8 = nn.Parameter(w_q, requires_grad=False)  # [N, K]
        layer.weight_scale = nn.Parameter(w_scale.float(), requires_grad=False)  # [N]
        layer.w8a8_packed = prepare(self.kernel, layer.weight_int8.data, layer.weight_scale.data)
        layer.w8a8_act_max = activation_max(self.kernel, int(w_q.abs().max().item()))

    def on_device(self, layer: nn.Module, device: torch.device) -> None:
        if self.kernel == "triton":  # the moved parameters are the packed weight
            layer.w8a8_packed = prepare(self.kernel, layer.weight_int8.data, layer.weight_scale.data)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = linear(self.kernel, layer.w8a8_packed, x2, bias, layer.w8a8_act_max, out_dtype=x.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def weight_bytes(self, layer: nn.Module) -> int:
        return _tensor_bytes(layer.weight_int8, layer.weight_scale)


def compressed_tensors_skip_modules(config: dict) -> tuple[str, ...]:
    """The modules a compressed-tensors `quantization_config` leaves float (its `ignore` list);
    ValueError unless it is the W8A8 int8 scheme this module runs."""
    if config.get("format", "int-quantized") != "int-quantized":
        raise ValueError(f"format {config.get('format')!r}: only 'int-quantized' (W8A8 int8) loads")
    if config.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"quantization_status {config.get('quantization_status')!r}, expected 'compressed'")
    if config.get("kv_cache_scheme"):
        raise ValueError("a kv_cache_scheme is not supported (use kv_cache_dtype 'fp8' instead)")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("no config_groups")
    for name, group in groups.items():
        problem = _group_problem(group)
        if problem:
            raise ValueError(
                f"config_groups.{name}: {problem}; only W8A8 int8 (weights symmetric per "
                "channel, activations dynamic symmetric per token) loads"
            )
    ignore = tuple(config.get("ignore") or ())
    patterns = [entry for entry in ignore if entry.startswith("re:")]
    if patterns:
        raise ValueError(f"ignore patterns ({', '.join(patterns)}) are not supported: list module names")
    ignore = tuple(entry for entry in ignore if entry != "lm_head")  # the head is never quantised
    check_fused_groups(ignore)
    return ignore


def check_fused_groups(ignored) -> None:
    """ValueError where `ignored` (module names left float) holds part of a group the engine fuses."""
    for group in FUSED_GROUPS:
        prefixes = {name.rsplit(".", 1)[0] for name in ignored if name.rsplit(".", 1)[-1] in group}
        for prefix in sorted(prefixes):
            missing = [f"{prefix}.{part}" for part in group if f"{prefix}.{part}" not in ignored]
            if missing:
                raise ValueError(
                    f"leaving only part of {prefix}'s {'/'.join(group)} float: the engine runs them as "
                    f"one layer; skip all of them or none ({', '.join(missing)} would be int8)"
                )


def _group_problem(group: dict) -> str | None:
    if group.get("format") not in (None, "int-quantized"):
        return f"format {group.get('format')!r}"
    if list(group.get("targets") or ()) != ["Linear"]:
        return f"targets {group.get('targets')!r} (expected ['Linear'])"
    expected = {
        "weights": {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "channel"},
        "input_activations": {
            "type": "int",
            "num_bits": 8,
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        },
    }
    for part, fields in expected.items():
        args = group.get(part)
        if not args:
            return f"no {part}"
        for field, value in fields.items():
            if args.get(field) != value:
                return f"{part}.{field} is {args.get(field)!r}, expected {value!r}"
    if group["weights"].get("dynamic"):
        return "weights.dynamic is true"
    if group.get("output_activations"):
        return "output_activations are quantised"
    return None


def _load_scale(weight_loader, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    # a checkpoint's scale is [N, 1]: this rank's rows of it, as the layer shards its weight's rows
    if not isinstance(loaded, torch.Tensor):  # a lazy tensor-parallel slice: scales are small
        loaded = loaded.narrow(0, 0, loaded.shape[0])
    loaded = loaded.reshape(-1).float()
    if shard_id is None:
        weight_loader(param, loaded)
    else:
        weight_loader(param, loaded, shard_id)
