"""The per-layer quantisation interface (vLLM's LinearMethodBase, in small).

Every LinearBase holds a `quant_method`. The layer keeps owning its parameters and its
tensor-parallel `weight_loader`, so a checkpoint loads exactly as for a float model (each
rank gets its own shard); then `process_weights_after_loading` turns the loaded float
weight into the method's own representation, before the model moves to its device. From
then on the layer's forward is `quant_method.apply(layer, x, bias)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """How one linear layer stores its weight and computes y = x W^T + b."""

    name = "none"

    def create_weights(self, layer: nn.Module) -> None:
        """Before loading: change what the layer expects from the checkpoint (pre-quantised folders)."""

    def process_weights_after_loading(self, layer: nn.Module, device: torch.device) -> None:
        """After loading, on the host: convert `layer.weight` and put the result on `device`."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes the layer's weight (and its scales) take in memory, bias excluded."""
        return _tensor_bytes(layer.weight)


class UnquantizedLinearMethod(LinearMethod):
    """The float weight as loaded: F.linear."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()  # stateless: one instance serves every layer


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
