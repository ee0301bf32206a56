"""Linear layers that know how to take their slice of a checkpoint tensor (nano-vllm).

Each parameter carries `param.weight_loader(param, loaded_weight, shard_id=None)`;
`engine.loader.weights.load_weights` calls it with the full Hugging Face tensor and the loader
copies this rank's part. Column-parallel layers split the output dim (0), row-parallel
layers the input dim (1). A loader raises ValueError when the checkpoint tensor's shape is
not the one it expects; the caller adds the file and tensor name.

`output_part` and `input_part` say which rows and columns of the full (unsharded) weight a rank
holds, for whatever else must be split as the weight is (LoRA adapters, engine.lora.slots).
`output_delta` is a term added to this rank's output before any all-reduce (a LoRA adapter's
x A^T B^T): in a row-parallel layer each rank adds its share of it to its partial product, and
the layer's one all-reduce sums the shares with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from engine.layers.tp import all_reduce, get_tp_rank, get_tp_size
from engine.quant.base import UNQUANTIZED, LinearMethod


class RankPart(NamedTuple):
    """The slice of one dimension of a full (unsharded) weight that this rank holds."""

    start: int
    size: int
    total: int  # the full dimension


class LinearBase(nn.Module):
    """y = x W^T + b with W [output_size, input_size] already this rank's part."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_dim: int | None = None):
        super().__init__()
        self.tp_dim = tp_dim  # dim of W split across ranks; None when replicated
        # this rank's W shape, which quantisation may repack (LoRA reads the logical one)
        self.input_size, self.output_size = input_size, output_size
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        # How the weight is stored and multiplied; engine.quant swaps it after loading.
        self.quant_method: LinearMethod = UNQUANTIZED
        # (x [T, in], y [T, out]) -> y with a term added, on this rank's output before any
        # all-reduce (engine.lora.slots sets it); None: nothing added
        self.output_delta: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's part of a checkpoint tensor into `param`; each subclass shards its own way."""
        raise TypeError(f"{type(self).__name__} defines no weight_loader: use a LinearBase subclass")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return y if self.output_delta is None else self.output_delta(x, y)

    @property
    def output_shards(self) -> dict:
        """This rank's output rows of each projection fused in the layer, keyed by shard id, in order."""
        return {None: self.output_size}

    def output_part(self, shard_id=None) -> RankPart:
        """The rows of projection `shard_id`'s full weight that this rank holds (all of them unless
        the layer splits its output)."""
        return RankPart(0, self.output_size, self.output_size)

    def input_part(self) -> RankPart:
        """The columns of the full weight (input features) that this rank holds (all of them unless
        the layer splits its input)."""
        return RankPart(0, self.input_size, self.input_size)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _copy_shard(param.data, loaded_weight, dim=0, index=0, num_shards=1)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its own slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        _check_divisible(output_size, tp_size, "output_size")
        super().__init__(input_size, output_size // tp_size, bias, tp_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        _copy_shard(param.data, loaded_weight, dim=0, index=self.tp_rank, num_shards=self.tp_size)

    def output_part(self, shard_id=None) -> RankPart:
        return RankPart(self.tp_rank * self.output_size, self.output_size, self.output_size * self.tp_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up: ids 0, 1).

    Each rank's W is [its slice of shard 0; its slice of shard 1; ...], so the output splits
    back into the projections locally without communication. A checkpoint tensor that is
    already fused (shard id None: Phi-3's gate_up_proj) is split into the shards first.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # the fused tensor [shard 0; shard 1; ...]
            _check_rows(loaded_weight, sum(self.output_sizes), param.shape[1:])
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, _rows(loaded_weight, sum(self.output_sizes[:i]), size), i)
            return
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param_slice = param.data.narrow(0, offset, size)
        _copy_shard(param_slice, loaded_weight, dim=0, index=self.tp_rank, num_shards=self.tp_size)

    @property
    def output_shards(self) -> dict:
        return {i: size // self.tp_size for i, size in enumerate(self.output_sizes)}

    def output_part(self, shard_id=None) -> RankPart:
        total = self.output_sizes[shard_id]
        size = total // self.tp_size
        return RankPart(self.tp_rank * size, size, total)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused (shard ids "q", "k", "v"); heads split across ranks.

    When there are fewer KV heads than ranks (MQA, small GQA), each KV head is replicated on
    tp_size // total_num_kv_heads consecutive ranks. A checkpoint tensor that is already fused
    (shard id None: Phi-3's qkv_proj, [q; k; v]) is split into q, k and v first.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
    ):
        tp_size = get_tp_size()
        _check_divisible(total_num_heads, tp_size, "num_attention_heads")
        if total_num_kv_heads >= tp_size:
            _check_divisible(total_num_kv_heads, tp_size, "num_key_value_heads")
        else:
            _check_divisible(tp_size, total_num_kv_heads, "tp_size")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.num_kv_head_replicas = max(1, tp_size // total_num_kv_heads)
        output_size = (total_num_heads + 2 * self.num_kv_heads * tp_size) * head_dim
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # the fused tensor [q; k; v] of every head
            q_total, kv_total = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
            _check_rows(loaded_weight, q_total + 2 * kv_total, param.shape[1:])
            for part, start, size in (
                ("q", 0, q_total),
                ("k", q_total, kv_total),
                ("v", q_total + kv_total, kv_total),
            ):
                self.weight_loader(param, _rows(loaded_weight, start, size), part)
            return
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, index, num_shards = 0, q_size, self.tp_rank, self.tp_size
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            index = self.tp_rank // self.num_kv_head_replicas
            num_shards = self.tp_size // self.num_kv_head_replicas
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        param_slice = param.data.narrow(0, offset, size)
        _copy_shard(param_slice, loaded_weight, dim=0, index=index, num_shards=num_shards)

    @property
    def output_shards(self) -> dict:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q": q, "k": kv, "v": kv}

    def output_part(self, shard_id=None) -> RankPart:
        if shard_id == "q":
            size = self.num_heads * self.head_dim
            return RankPart(self.tp_rank * size, size, self.total_num_heads * self.head_dim)
        # k, v: this rank's KV heads, shared by num_kv_head_replicas consecutive ranks
        size = self.num_kv_heads * self.head_dim
        start = self.tp_rank // self.num_kv_head_replicas * size
        return RankPart(start, size, self.total_num_kv_heads * self.head_dim)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = get_tp_size()
        _check_divisible(input_size, tp_size, "input_size")
        super().__init__(input_size // tp_size, output_size, bias, tp_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        # The bias is not split: every rank holds it, only rank 0 adds it (see forward).
        if param.dim() == 1:
            _copy_shard(param.data, loaded_weight, dim=0, index=0, num_shards=1)
        else:
            _copy_shard(param.data, loaded_weight, dim=1, index=self.tp_rank, num_shards=self.tp_size)

    def input_part(self) -> RankPart:
        return RankPart(self.tp_rank * self.input_size, self.input_size, self.input_size * self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, input_size // tp_size] -> [T, output_size]
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        if self.output_delta is not None:
            # before the all-reduce: a LoRA delta x A^T B^T is linear in x, so each rank adds
            # its share (its columns of x and A) and the one all-reduce below sums them
            y = self.output_delta(x, y)
        # tensor parallel: sum the ranks' partial products (identity when tp_size == 1)
        return all_reduce(y)


def _copy_shard(
    param_slice: torch.Tensor, loaded_weight: torch.Tensor, dim: int, index: int, num_shards: int
) -> None:
    """Copy part `index` of `num_shards` equal parts of `loaded_weight` along `dim`."""
    expected = list(param_slice.shape)
    expected[dim] *= num_shards
    if list(loaded_weight.shape) != expected:
        raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {tuple(expected)}")
    size = param_slice.size(dim)
    param_slice.copy_(loaded_weight.narrow(dim, index * size, size))


def _rows(loaded_weight, start: int, length: int):
    """Rows [start, start + length) of a checkpoint tensor, unread if it is not read yet."""
    if hasattr(loaded_weight, "rows"):  # engine.loader.weights' lazy checkpoint slice
        return loaded_weight.rows(start, length)
    return loaded_weight.narrow(0, start, length)


def _check_rows(loaded_weight, num_rows: int, other_dims: torch.Size) -> None:
    expected = (num_rows, *other_dims)
    if tuple(loaded_weight.shape) != expected:
        raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {expected}")


def _check_divisible(numerator: int, denominator: int, what: str) -> None:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
