"""A worker process of a parallel engine: one rank's shard of the model and of the KV cache.

It joins the world, loads only its share of the checkpoint (from the facts and quantisation
plan rank 0 hands it: it reads no config of its own), agrees with the other ranks on
the KV block pool, then runs every step rank 0 sends until told to stop. It never schedules:
the plan comes from rank 0 over the control group. It exits with its parent, even when the
parent is killed, so no worker outlives the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading

import torch

from engine.config import EngineConfig
from engine.distributed import parallel_state as ps
from engine.distributed.layout import local_world_size_of
from engine.executor.model_runner import ModelRunner
from engine.executor.runtime import ModelSpec
from engine.layers.fused_ops import use_fused_cpu_ops
from engine.layers.packed_linear import pack_linear_weights
from engine.loader.weights import build_model
from engine.lora import LoRASlots, read_adapter

log = logging.getLogger(__name__)


def build_runner(config: EngineConfig, spec: ModelSpec, local_rank: int) -> ModelRunner:
    """This rank's model shard on its device (CUDA: cuda:local_rank), wrapped in a ModelRunner:
    built from the checkpoint's facts and quantised by the plan `spec` carries (neither is
    read or made again here)."""
    if config.world_size > 1 and config.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        config = dataclasses.replace(config, device=f"cuda:{local_rank}")
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    # each LoRA adapter read and checked before the model loads; against the model's shapes after
    adapters = {
        name: read_adapter(name, folder, config.max_lora_rank)
        for name, folder in config.lora_adapters.items()
    }
    model = build_model(spec.checkpoint, dtype, device, spec.quant_plan)  # each rank quantises its shard
    lora = None
    if adapters:  # before packing: the slots read the layers' plain shapes
        lora = LoRASlots(model, adapters, config.max_loras, config.max_lora_rank, device, dtype)
    if config.cpu_weight_prepack:
        pack_linear_weights(model, device, dtype)
    if config.cpu_fused_ops and device.type == "cpu":
        use_fused_cpu_ops(model)
    runner = ModelRunner(config, model, spec.attention_backend, spec.block_size)
    runner.lora = lora
    return runner


def join_and_load(
    config: EngineConfig, spec: ModelSpec, rank: int, local_rank: int, init_method: str
) -> tuple[ModelRunner, int, list[int] | None]:
    """Join the world, build this rank's runner, allocate the pool all ranks agree on (collective).

    Returns the runner, the pool's number of blocks and, on rank 0, each rank's parameter count.
    """
    dist_backend = "nccl" if config.device.startswith("cuda") else "gloo"
    if dist_backend == "nccl":
        torch.cuda.set_device(local_rank)  # before joining: NCCL binds each rank to the current device
    if dist_backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share this machine's cores: without a share each, they oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size_of(config)))
    ps.init_parallel_state(
        rank,
        config.tensor_parallel_size,
        config.pipeline_parallel_size,
        init_method,
        dist_backend,
        config.distributed_timeout_s,
        expert_parallel=config.expert_parallel,
    )
    block_size = spec.block_size
    if ps.all_reduce_min(block_size) != -ps.all_reduce_min(-block_size):
        raise RuntimeError(f"rank {rank}: the ranks disagree on the KV block size (this one: {block_size})")
    runner = build_runner(config, spec, local_rank)
    # every rank holds the same block ids: the pool is the smallest that fits on all of them
    num_blocks = ps.all_reduce_min(runner.blocks_that_fit())
    num_parameters = ps.gather_to_driver(runner.num_parameters())  # how the weights were sharded
    return runner, runner.allocate_kv_cache(num_blocks), num_parameters


def run_worker(
    config: EngineConfig,
    spec: ModelSpec,  # rank 0's: the checkpoint's facts and the quantisation plan, not read again
    rank: int,
    local_rank: int,
    init_method: str,
    ready,  # multiprocessing queue: this rank's number once it is about to join
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle (it drains)
    _exit_with_parent()
    ready.put(rank)
    try:
        runner, _, _ = join_and_load(config, spec, rank, local_rank, init_method)
        serve(runner)
    finally:
        ps.destroy_parallel_state()


def serve(runner: ModelRunner) -> None:
    """Run what rank 0 broadcasts: ("step", plan) or ("stop",)."""
    state = ps.get_parallel_state()
    while True:
        message = ps.broadcast_from_driver(None)
        match message:
            case ("step", plan):
                output = runner.execute(plan)
                if state.is_sampling_rank:  # pipeline: the last stage samples, rank 0 schedules
                    ps.send_to_driver(None if output is None else output.cpu())
            case ("stop",):
                return
            case _:
                raise RuntimeError(f"rank {state.rank}: unknown message {message!r} from rank 0")


def _exit_with_parent() -> None:
    # The parent's sentinel closes when it dies, however it dies (kill -9 included).
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_then_exit() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()
