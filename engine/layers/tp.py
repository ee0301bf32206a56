"""Tensor-parallel rank, world size and collectives, as seen by the layers.

The layers read these at construction (their shard) and in forward (the collectives); the
values come from engine.distributed.parallel_state, which the engine and its worker processes
set up before building the model. Outside a parallel engine every process is rank 0 of 1,
the weight loaders take the whole tensor, and the collectives are the identity.
"""

from __future__ import annotations

import torch

from engine.distributed.parallel_state import get_parallel_state, tp_all_gather, tp_all_reduce


def get_tp_rank() -> int:
    return get_parallel_state().tp_rank


def get_tp_size() -> int:
    return get_parallel_state().tp_size


def is_expert_parallel() -> bool:
    """EngineConfig.expert_parallel: mixture-of-experts layers split their experts, not each expert."""
    return get_parallel_state().expert_parallel


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel group (RowParallelLinear, VocabParallelEmbedding)."""
    return tp_all_reduce(x)


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in rank order (ParallelLMHead)."""
    return tp_all_gather(x, dim)
