"""This process's place in the parallel layout: ranks, process groups and the collectives on them.

Rank layout (vLLM's): rank = pp_rank * tp_size + tp_rank, so the tp_size ranks of a pipeline
stage are consecutive. Three kinds of groups, created identically on every rank:
- tensor-parallel groups (the ranks of one stage): all_reduce / all_gather inside the layers;
- point-to-point between rank r and r + tp_size: activations from one stage to the next;
- the control group (every rank, gloo even on CUDA): each step's plan from rank 0, results back.
  Its timeout is long because workers wait on it while the engine is idle; the data groups
  use `distributed_timeout_s`, so a peer that stops answering fails a step instead of hanging it.

One parallel engine per process at a time: the state is process-wide, as torch.distributed's
default group is. With tensor_parallel_size = pipeline_parallel_size = 1 nothing is initialised
and every collective is the identity.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

_IDLE_TIMEOUT = datetime.timedelta(days=365)  # control group: workers wait on it while the engine idles


@dataclass(slots=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    # EngineConfig.expert_parallel: the tensor-parallel ranks split each MoE layer's experts
    expert_parallel: bool = False

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_sampling_rank(self) -> bool:
        """The one rank that samples: tensor-parallel rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def sampling_rank(self) -> int:
        return (self.pp_size - 1) * self.tp_size


_state = ParallelState()


def get_parallel_state() -> ParallelState:
    return _state


def init_parallel_state(
    rank: int,
    tp_size: int,
    pp_size: int,
    init_method: str,
    backend: str,
    timeout_s: float,
    expert_parallel: bool = False,
) -> ParallelState:
    """Join the world of tp_size * pp_size ranks (blocks until every rank has joined) and make the groups."""
    global _state
    world_size = tp_size * pp_size
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    tp_group = None
    for stage in range(pp_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)), timeout=timeout)
        if stage == rank // tp_size:
            tp_group = group
    control_group = dist.new_group(list(range(world_size)), backend="gloo", timeout=_IDLE_TIMEOUT)
    _state = ParallelState(rank, world_size, tp_size, pp_size, tp_group, control_group, expert_parallel)
    return _state


def destroy_parallel_state() -> None:
    """Leave the world; safe to call when it was never joined or a peer is gone."""
    global _state
    _state = ParallelState()
    if dist.is_initialized():
        dist.destroy_process_group()


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The contiguous layers of stage `pp_rank`; the first num_layers % pp_size stages take one more."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


# Tensor-parallel collectives (the layers call these through engine.layers.tp)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=dim)


# Pipeline point-to-point: rank r of stage s talks to rank r of stages s - 1 and s + 1


def send_to_next_stage(tensors: list[torch.Tensor]) -> list[tuple[dist.Work, torch.Tensor]]:
    """Start sending `tensors` to this rank's peer in the next stage.

    Returns (handle, tensor) pairs: wait on each handle, and keep its tensor alive until then.
    """
    dst = _state.rank + _state.tp_size
    contiguous = [t.contiguous() for t in tensors]
    return [(dist.isend(t, dst=dst), t) for t in contiguous]


def recv_from_prev_stage(shapes: list[tuple[int, ...]], dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Receive tensors of the given shapes, in order, from this rank's peer in the previous stage."""
    src = _state.rank - _state.tp_size
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    for t in tensors:
        dist.recv(t, src=src)
    return tensors


# Control plane (gloo, every rank)


def broadcast_from_driver(message: object) -> object:
    """Rank 0 sends `message`; every rank returns it."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=_state.control_group)
    return box[0]


def gather_to_driver(value: object) -> list[object] | None:
    """Rank 0 gets every rank's `value`, in rank order; the others get None."""
    values = [None] * _state.world_size if _state.rank == 0 else None
    dist.gather_object(value, values, dst=0, group=_state.control_group)
    return values


def send_to_driver(value: object) -> None:
    dist.send_object_list([value], dst=0, group=_state.control_group)


def recv_from(rank: int) -> object:
    box = [None]
    dist.recv_object_list(box, src=rank, group=_state.control_group)
    return box[0]


def all_reduce_min(value: int) -> int:
    """The smallest `value` over all ranks (the KV block pool every rank can hold)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_state.control_group)
    return int(t.item())
