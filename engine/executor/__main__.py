"""Run one rank of a parallel engine whose rank 0 is on another machine (multi-node).

    RANK=8 LOCAL_RANK=0 WORLD_SIZE=16 MASTER_ADDR=node0 MASTER_PORT=29500 \\
        python -m engine.executor --config engine.json

`--config` is a JSON object of EngineConfig fields, the same as rank 0's engine (model,
dtype, device, tensor_parallel_size, pipeline_parallel_size, block and KV options). The rank
joins rank 0 at MASTER_ADDR:MASTER_PORT, serves its steps, and exits with status 0 when the
engine closes, or non-zero when the engine fails or goes away.

No rank 0 runs in this process to hand the checkpoint's facts down, so this rank reads the
checkpoint folder (its own copy, at `model`) once itself, as rank 0 does, and derives the
runtime and the quantisation plan from it by rank 0's rule (resolve_model_spec): one read of
config.json per process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from engine.config import EngineConfig, EngineConfigError
from engine.distributed import parallel_state as ps
from engine.executor.runtime import resolve_dtype, resolve_model_spec
from engine.executor.worker import join_and_load, serve
from engine.loader.checkpoint import ModelLoadError, read_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.executor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of EngineConfig fields (rank 0's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        config = resolve_dtype(EngineConfig(**json.loads(Path(args.config).read_text())))
        checkpoint, _ = read_checkpoint(config.model, config.max_model_len)  # this process's one read
        # the backend, block size and plan rank 0 derives from the same options (checked on joining)
        spec = resolve_model_spec(config, checkpoint)
        rank, local_rank, world_size = (_env_int(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        address = f"tcp://{os.environ['MASTER_ADDR']}:{_env_int('MASTER_PORT')}"
    except (OSError, ValueError, TypeError, KeyError, EngineConfigError, ModelLoadError) as e:
        print(f"python -m engine.executor: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if world_size != config.world_size or not 0 < rank < world_size:
        print(
            f"python -m engine.executor: WORLD_SIZE={world_size} must equal tensor_parallel_size * "
            f"pipeline_parallel_size = {config.world_size}, and RANK={rank} be in [1, {world_size})",
            file=sys.stderr,
        )
        return 2
    try:
        runner, _, _ = join_and_load(config, spec, rank, local_rank, address)
        serve(runner)
    finally:
        ps.destroy_parallel_state()
    return 0


def _env_int(name: str) -> int:
    if name not in os.environ:
        raise KeyError(f"{name} is not set (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE)")
    return int(os.environ[name])


if __name__ == "__main__":
    sys.exit(main())
