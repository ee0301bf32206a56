"""Tensor-parallel rank, world size and collectives, as seen by the layers.

A placeholder until the parallel issue: it fills these in from torch.distributed (one
process per GPU). Until then every process is rank 0 of 1, the layers' weight loaders
take the whole tensor, and the collectives are the identity.
"""

from __future__ import annotations

import torch


def get_tp_rank() -> int:
    return 0


def get_tp_size() -> int:
    return 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel group (RowParallelLinear, VocabParallelEmbedding)."""
    if get_tp_size() == 1:
        return x
    raise RuntimeError("tensor parallelism is not set up")


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in rank order (ParallelLMHead)."""
    if get_tp_size() == 1:
        return x
    raise RuntimeError("tensor parallelism is not set up")
