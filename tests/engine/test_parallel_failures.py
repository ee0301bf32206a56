"""A parallel engine whose worker dies fails fast with the rank's name; no worker outlives it.

Every failure ends the engine for good (EngineDeadError), never a hang: its ranks are out of step.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    ModelLoadError,
    SamplingParams,
    WorkerDiedError,
)
from tests.engine.async_requests import generate

# Far below distributed_timeout_s (300 s), so the error must come from the watcher, not a timeout;
# far above what it takes (about a second), so a slow or busy machine passes as well.
FAIL_FAST_S = 60.0
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
SMALL_KV = {"num_kv_blocks": 256}  # not the default 2 GiB per rank: these engines are short-lived


def _prompts(n: int) -> list[list[int]]:
    return [[1, 10 + i, 20 + i, 30 + i] for i in range(n)]


def test_killed_worker_fails_the_next_step_naming_its_rank(tiny_checkpoint):
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), tensor_parallel_size=2, **SMALL_KV)
    )
    try:
        for i, prompt in enumerate(_prompts(4)):
            engine.add_request(f"r{i}", prompt, LONG)
        engine.step()
        pid = engine.executor.worker_pids[1]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            for _ in range(1000):  # the step in flight or the next one raises, never a hang
                engine.step()
        assert time.monotonic() - start < FAIL_FAST_S
        with pytest.raises(WorkerDiedError, match="rank 1"):  # and every step after it
            engine.step()
    finally:
        engine.close()
    assert not _is_running(pid)


def test_last_stage_killed_mid_generation_fails_it_naming_the_rank(tiny_checkpoint):
    # pipeline: rank 0 waits on the last stage (rank 1) for the sampled tokens when it dies
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), pipeline_parallel_size=2, **SMALL_KV)
    )
    pid = engine.executor.worker_pids[1]
    killed_at = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(1.0, kill)
    timer.start()
    try:
        with pytest.raises(WorkerDiedError, match="rank 1"):
            engine.generate(_prompts(8), LONG, use_tqdm=False)
        assert time.monotonic() - killed_at[0] < FAIL_FAST_S
    finally:
        timer.cancel()
        engine.close()
    assert not _is_running(pid)


def test_workers_ignore_ctrl_c_and_closing_the_engine_reaps_them(tiny_checkpoint):
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), tensor_parallel_size=2, **SMALL_KV)
    )
    pids = list(engine.executor.worker_pids.values())
    for pid in pids:  # a terminal's Ctrl-C reaches the whole process group; the engine decides
        os.kill(pid, signal.SIGINT)
    outputs = engine.generate(_prompts(2), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [4, 4]
    engine.close()
    engine.close()  # idempotent
    assert not any(_is_running(pid) for pid in pids)
    engine.add_request("after-close", [1, 2, 3], SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.step()


@pytest.mark.slow
def test_workers_exit_when_the_engine_process_is_killed(tiny_checkpoint, tmp_path):
    # kill -9 of the engine runs no cleanup at all: the workers must notice on their own
    script = tmp_path / "engine_then_sleep.py"
    script.write_text(_ENGINE_THEN_SLEEP)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tiny_checkpoint)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert pids, "the engine process printed no worker pids"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + FAIL_FAST_S
    while any(_is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_is_running(pid) for pid in pids)


_ENGINE_THEN_SLEEP = """
import sys, time
from engine import EngineConfig, LLMEngine

if __name__ == "__main__":
    engine = LLMEngine(EngineConfig(dtype="float32", model=sys.argv[1], tensor_parallel_size=2, num_kv_blocks=256))
    print(*engine.executor.worker_pids.values(), flush=True)
    time.sleep(600)
"""


def _is_running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_async_engine_fails_every_request_and_stops_when_a_worker_dies(tiny_checkpoint):
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), tensor_parallel_size=2, **SMALL_KV)
    )
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        running = asyncio.ensure_future(generate(async_engine, "long", _prompts(1)[0], LONG))
        await asyncio.sleep(0.5)
        os.kill(engine.executor.worker_pids[1], signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            await asyncio.wait_for(running, FAIL_FAST_S)
        await asyncio.sleep(0.1)
        assert not async_engine.is_running  # liveness: the service's /healthz turns 503
        with pytest.raises(WorkerDiedError, match="rank 1"):  # later requests fail at once
            await asyncio.wait_for(generate(async_engine, "late", [1, 2, 3], LONG), 1.0)
    finally:
        await async_engine.stop()
        engine.close()


def test_a_step_that_fails_on_rank_0_stops_the_workers_and_the_engine(tiny_checkpoint, monkeypatch):
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), tensor_parallel_size=2, **SMALL_KV)
    )
    pids = list(engine.executor.worker_pids.values())

    def broken_forward(*args, **kwargs):
        raise RuntimeError("boom")  # rank 1 is left waiting in the step's first all-reduce

    try:
        monkeypatch.setattr(engine.runner.model, "forward", broken_forward)
        engine.add_request("r", [1, 2, 3], LONG)
        with pytest.raises(EngineDeadError, match="RuntimeError: boom"):
            engine.step()
        assert not any(_is_running(pid) for pid in pids)
        with pytest.raises(EngineDeadError):  # and every step after it, at once
            engine.step()
    finally:
        engine.close()


def test_a_checkpoint_that_cannot_load_fails_start_up_with_its_own_error(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 344}))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight' has shape"):
        LLMEngine(EngineConfig(dtype="float32", model=str(broken), tensor_parallel_size=2, **SMALL_KV))
    assert not _spawned_children()  # the worker that failed alike is reaped


def _spawned_children() -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"spawn_main" in cmdline and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children
