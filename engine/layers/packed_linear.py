"""CPU linear layers whose float weight oneDNN packs once, at load (vLLM's `onednn_mm` does the same).

`F.linear` on CPU hands a plain row-major weight to the BLAS on every call: in bfloat16 oneDNN
reorders it into its blocked layout each time (the weight is read twice per matmul), and in
float32 the call goes to MKL's sgemm. Packing the weight once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's CPU freezing uses) leaves one read
per step. Measured on this project's 2-core AVX512-BF16 machine, one thread, 768x3072 weights:
1.1-1.35x in bfloat16 (most at decode sizes, 16-64 rows) and 1.3-1.7x in float32; a single row
gains nothing. bfloat16 results are bit-identical to `F.linear`; float32 ones differ in the last
bits (another summation order), as any BLAS change does.

bfloat16 weights are packed only where oneDNN has a bfloat16 path (AVX-512 or AVX-NE-CONVERT): on
an AVX2-only CPU the reorder raises. There the weights stay bfloat16 in memory and
`Bfloat16OnFloat32Method` computes: PyTorch's own bfloat16 matmul (what Transformers runs there)
is a row-by-row dot product, as fast as float32 for a few rows but 3-5x slower from 8 rows up
(measured with AVX-512 capped off: 2304x768, 32 rows 2.18 ms vs 0.78 ms widened to float32;
loadtest/RESULTS.md), so steps of 8 rows or more widen the weight to float32 for the call (MKL's
sgemm; products exact, sums in float32 as in the bfloat16 matmul, output rounded to bfloat16) and
smaller ones, where reading the weight's bytes once decides, keep the bfloat16 matmul. The log
says which path a CPU engine took, once.

Small float32 weights are not packed. A packed call has a fixed cost that F.linear's has not
(~22 us on a Zen 3 core pair), and oneDNN builds a new primitive the first time it sees a row
count (~1 ms for a 128x128 weight), which a batch that shrinks as its sequences finish meets at
nearly every step. Timed alone at 1-512 rows on the AVX2 Zen 3, 2 threads
(loadtest/bench_small_kernels.py, loadtest/RESULTS.md): F.linear is faster for every weight
below 512x512 elements at every row count (128x128 at 128 rows: 30 against 53 us), about level
at 2**18 elements, and slower from 512x1024 up at 16-128 rows (the gain packing is for:
768x2304 at 16 rows, 604 against 499 us). So float32 weights below 2**18 elements stay with
F.linear; on the micro checkpoint (projections of 128x128 to 344x128) the decode workload ran
1.10-1.11x faster (medians of 6 alternating rounds, two runs). bfloat16 weights are packed at
every size: F.linear in bfloat16 reorders the weight on every call, and no AVX-512 machine was
at hand to measure small ones.

Only unquantised LinearBase layers on a CPU engine are packed; quantised methods keep their own
kernels. The packed weight stays the layer's `weight` parameter (same shape, dtype and size), so
parameter counts and weight bytes read as before; it is opaque (layout torch._mkldnn), so
nothing may read its values after packing. The LM head's weight is packed the same way; a tied
head's weight is also the token embedding's lookup table, so there the head multiplies by a
packed copy (as vLLM's CPU path does), which costs vocab x hidden weights more memory.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_features
from engine.layers.embed_head import ParallelLMHead, lm_heads
from engine.layers.linear import LinearBase
from engine.quant.base import UNQUANTIZED, LinearMethod

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_DECODE_ROWS_HINT = 64  # oneDNN picks its blocking for this many rows; any number of rows works
# float32 weights smaller than this many elements (1 MiB) stay with F.linear (module docstring)
MIN_PACKED_FLOAT32_WEIGHT = 1 << 18

log = logging.getLogger(__name__)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack `dtype` weights for `device` (CPU with oneDNN
    only; bfloat16 only where oneDNN has a bfloat16 path on this CPU)."""
    return (
        device.type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and (dtype != torch.bfloat16 or cpu_features.onednn_has_bf16())
    )


def worth_packing(weight: torch.Tensor) -> bool:
    """Whether oneDNN's packed call should beat F.linear's for this weight: every bfloat16 one,
    float32 ones from MIN_PACKED_FLOAT32_WEIGHT elements (module docstring)."""
    return weight.dtype != torch.float32 or weight.numel() >= MIN_PACKED_FLOAT32_WEIGHT


class OneDNNPackedLinearMethod(LinearMethod):
    """y = x W^T + b with W in oneDNN's blocked layout, packed once."""

    name = "onednn-packed"

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device | None = None) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), _DECODE_ROWS_HINT)
        layer.weight = nn.Parameter(packed, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, bias, "none", [], "")


class Bfloat16OnFloat32Method(LinearMethod):
    """bfloat16 weights where oneDNN has no bfloat16 path: float32 arithmetic from 8 rows up."""

    name = "bf16-fp32-compute"
    MIN_WIDENED_ROWS = 8  # below it, PyTorch's bfloat16 matmul is as fast and reads half the bytes

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _bf16_linear(x, layer.weight, bias)


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.numel() < Bfloat16OnFloat32Method.MIN_WIDENED_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    widened_bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), widened_bias).to(x.dtype)


ONEDNN_PACKED = OneDNNPackedLinearMethod()  # stateless: one instance serves every layer
BF16_ON_FP32 = Bfloat16OnFloat32Method()
FLOAT_METHOD_NAMES = ("none", ONEDNN_PACKED.name, BF16_ON_FP32.name)  # a float (unquantised) layer


@torch.no_grad()
def pack_linear_weights(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Pack every unquantised linear layer's weight of `model`, and its LM head's; returns how many."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_features.onednn_has_bf16():
        return _widen_bfloat16_matmuls(model)
    if not can_pack(device, dtype):
        return 0
    packed = 0
    for module in model.modules():
        if (
            isinstance(module, LinearBase)
            and module.quant_method is UNQUANTIZED
            and module.weight.dtype == dtype
            and worth_packing(module.weight)
        ):
            ONEDNN_PACKED.process_weights_after_loading(module)
            module.quant_method = ONEDNN_PACKED
            packed += 1
    for head, tied in lm_heads(model):
        if head.matmul is None and head.weight.dtype == dtype and worth_packing(head.weight):
            weight = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), _DECODE_ROWS_HINT)
            if not tied:  # nothing else reads the plain weight
                head.weight = nn.Parameter(weight, requires_grad=False)
            head.matmul = functools.partial(_packed_linear, weight=weight)
            packed += 1
    return packed


def _widen_bfloat16_matmuls(model: nn.Module) -> int:
    """The CPU has no oneDNN bfloat16 path: float bfloat16 layers and the LM head compute through
    `_bf16_linear` (weights unchanged); returns how many. Logged once per process."""
    changed = 0
    for module in model.modules():
        if (
            isinstance(module, LinearBase)
            and module.quant_method is UNQUANTIZED
            and module.weight.dtype == torch.bfloat16
        ):
            module.quant_method = BF16_ON_FP32
            changed += 1
        elif (
            isinstance(module, ParallelLMHead)
            and module.matmul is None  # None: not already int8 (quantize_lm_head)
            and module.weight.dtype == torch.bfloat16
        ):
            module.matmul = functools.partial(_bf16_linear, weight=module.weight)
            changed += 1
    _log_bfloat16_path()
    return changed


def _packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@functools.cache
def _log_bfloat16_path() -> None:
    log.info(
        "bfloat16 linear layers: oneDNN has no bfloat16 path on this CPU (%s; it needs AVX-512 or "
        "AVX-NE-CONVERT): weights stay bfloat16, steps of %d rows or more compute in float32, "
        "smaller ones in PyTorch's bfloat16 matmul",
        cpu_features.describe(),
        Bfloat16OnFloat32Method.MIN_WIDENED_ROWS,
    )
