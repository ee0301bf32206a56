"""A rank started by hand from the torch.distributed environment joins an engine (multi-node, on one machine).

The engine runs only rank 0 here (LOCAL_WORLD_SIZE=1); rank 1 is `python -m engine.executor`,
as it would be on a second machine, finding rank 0 through MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import EngineConfig, EngineDeadError, LLMEngine, SamplingParams

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = {"tensor_parallel_size": 2, "num_kv_blocks": 64, "dtype": "float32"}


def _launch_rank_1(options: dict, tmp_path: Path, monkeypatch) -> subprocess.Popen:
    """Rank 1 as `python -m engine.executor`; this process will be rank 0 and start no worker."""
    (tmp_path / "engine.json").write_text(json.dumps(options))
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "1",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
    }
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "engine.executor", "--config", str(tmp_path / "engine.json")], env=env
    )


@pytest.mark.slow
def test_a_rank_launched_from_the_environment_serves_the_engine(tiny_checkpoint, tmp_path, monkeypatch):
    options = {"model": str(tiny_checkpoint), **OPTIONS}
    remote = _launch_rank_1(options, tmp_path, monkeypatch)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        prompts = [[1, 50, 60, 70], [1, 7]]
        with LLMEngine(EngineConfig(**options)) as engine:
            assert engine.executor.worker_pids == {}
            parallel = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        assert remote.wait(timeout=30) == 0  # the engine's close() told it to stop
    finally:
        remote.kill()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    single = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), num_kv_blocks=64))
    assert parallel == [o.token_ids for o in single.generate(prompts, params, use_tqdm=False)]


@pytest.mark.slow
def test_a_remote_rank_that_dies_fails_the_engine_instead_of_hanging_it(
    tiny_checkpoint, tmp_path, monkeypatch
):
    options = {"model": str(tiny_checkpoint), **OPTIONS}
    remote = _launch_rank_1(options, tmp_path, monkeypatch)
    try:
        with LLMEngine(EngineConfig(**options)) as engine:
            engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True))
            engine.step()
            remote.kill()
            remote.wait()
            start = time.monotonic()
            with pytest.raises(EngineDeadError, match="a step of the parallel engine failed"):
                while engine.has_unfinished_requests():
                    engine.step()
            assert time.monotonic() - start < 60.0  # the watcher's error, not the 300 s timeout
    finally:
        remote.kill()
