"""CPU linear layers whose float weight oneDNN packs once, at load (vLLM's `onednn_mm` does the same).

`F.linear` on CPU hands a plain row-major weight to the BLAS on every call: in bfloat16 oneDNN
reorders it into its blocked layout each time (the weight is read twice per matmul), and in
float32 the call goes to MKL's sgemm. Packing the weight once into oneDNN's own layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's CPU freezing uses) leaves one read
per step. Measured on this project's 2-core AVX512-BF16 machine, one thread, 768x3072 weights:
1.1-1.35x in bfloat16 (most at decode sizes, 16-64 rows) and 1.3-1.7x in float32; a single row
gains nothing. bfloat16 results are bit-identical to `F.linear`; float32 ones differ in the last
bits (another summation order), as any BLAS change does.

Only unquantised LinearBase layers on a CPU engine are packed; quantised methods keep their own
kernels. The packed weight stays the layer's `weight` parameter (same shape, dtype and size), so
parameter counts and weight bytes read as before; it is opaque (layout torch._mkldnn), so
nothing may read its values after packing. The LM head's weight is packed the same way; a tied
head's weight is also the token embedding's lookup table, so there the head multiplies by a
packed copy (as vLLM's CPU path does), which costs vocab x hidden weights more memory.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import LinearBase
from engine.quant.base import UNQUANTIZED, LinearMethod

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_DECODE_ROWS_HINT = 64  # oneDNN picks its blocking for this many rows; any number of rows works


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack `dtype` weights for `device` (CPU with oneDNN only)."""
    return (
        device.type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class OneDNNPackedLinearMethod(LinearMethod):
    """y = x W^T + b with W in oneDNN's blocked layout, packed once."""

    name = "onednn-packed"

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device | None = None) -> None:
        packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), _DECODE_ROWS_HINT)
        layer.weight = nn.Parameter(packed, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, bias, "none", [], "")


ONEDNN_PACKED = OneDNNPackedLinearMethod()  # stateless: one instance serves every layer
FLOAT_METHOD_NAMES = ("none", ONEDNN_PACKED.name)  # a layer with either is a float (unquantised) layer


@torch.no_grad()
def pack_linear_weights(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Pack every unquantised linear layer's weight of `model`, and its LM head's; returns how many."""
    if not can_pack(device, dtype):
        return 0
    lookup_tables = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    packed = 0
    for module in model.modules():
        if (
            isinstance(module, LinearBase)
            and module.quant_method is UNQUANTIZED
            and module.weight.dtype == dtype
        ):
            ONEDNN_PACKED.process_weights_after_loading(module)
            module.quant_method = ONEDNN_PACKED
            packed += 1
        elif isinstance(module, ParallelLMHead) and module.weight.dtype == dtype:
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _DECODE_ROWS_HINT)
            if id(module.weight) not in lookup_tables:  # untied: nothing else reads the plain weight
                module.weight = nn.Parameter(weight, requires_grad=False)
            module.matmul = functools.partial(_packed_linear, weight=weight)
            packed += 1
    return packed


def _packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
