"""2:4 semi-structured sparse weights (checkpoints pruned by engine.compress).

On CUDA the pruned weight becomes a `torch.sparse.to_sparse_semi_structured` tensor (half the
values plus 2-bit indices, run by cuSPARSELt/CUTLASS sparse kernels); PyTorch supports it for
float16 and bfloat16 weights whose shape its kernels tile. Anywhere else (CPU, float32, an
untileable shape) the weight stays dense, which computes the same product: the layer's
`is_sparse24` says which one it got, and the model logs the count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.base import LinearMethod, _tensor_bytes

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def is_2to4_sparse(weight: torch.Tensor) -> bool:
    """At most two non-zeros in every group of four consecutive input features."""
    if weight.shape[-1] % 4:
        return False
    groups = weight.reshape(-1, 4)
    return bool(((groups != 0).sum(dim=-1) <= 2).all())


class Sparse24LinearMethod(LinearMethod):
    name = "sparse24"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not is_2to4_sparse(layer.weight.data):
            raise ValueError("the checkpoint is marked 2:4-pruned but this layer's weight is not 2:4 sparse")
        layer.is_sparse24 = False

    def on_device(self, layer: nn.Module, device: torch.device) -> None:
        reason = _unsupported_reason(layer.weight, device)
        if reason is None:
            try:
                from torch.sparse import to_sparse_semi_structured

                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.data), requires_grad=False)
                layer.is_sparse24 = True
                return
            except (RuntimeError, ValueError) as e:  # shape or kernel constraints PyTorch checks itself
                reason = str(e).splitlines()[0]
        layer.sparse24_dense_reason = reason

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def weight_bytes(self, layer: nn.Module) -> int:
        weight = layer.weight
        if getattr(layer, "is_sparse24", False):  # the kept values and their metadata
            inner, _ = weight.__tensor_flatten__()
            return _tensor_bytes(*(getattr(weight, name) for name in inner))
        return _tensor_bytes(weight)


def _unsupported_reason(weight: torch.Tensor, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "semi-structured sparse kernels need CUDA"
    if weight.dtype not in SPARSE_DTYPES:
        return f"semi-structured sparse kernels take float16/bfloat16 weights, not {weight.dtype}"
    return None
