"""Executors: how LLMEngine runs a StepPlan, on one process or on a parallel world of them.

MultiprocExecutor is rank 0's side of a parallel engine (vLLM v1's executor, in miniature).
It spawns a worker process for every other rank on this machine, joins them as rank 0, and
each step broadcasts the plan over the gloo control group, runs rank 0's own share, and (with
pipeline parallelism) receives the sampled tokens from the last stage. torch.distributed
rather than shared memory carries the plan so that the same code spans several machines.

Failure: a thread watches the workers' process sentinels. When one dies, it records which
rank and how, and kills the others: every connection rank 0 is blocked on then closes, so the
step in flight raises at once instead of waiting for a timeout, and the engine raises
WorkerDiedError naming the rank, from then on. close() stops the workers and reaps them; they
also exit on their own when this process dies.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import threading
import time
import weakref

import torch

from engine.config import EngineConfig
from engine.core.step_plan import StepPlan
from engine.distributed import parallel_state as ps
from engine.distributed.layout import local_world_size_of
from engine.executor.runtime import ModelSpec
from engine.executor.worker import build_runner, join_and_load, run_worker
from engine.loader.checkpoint import ModelLoadError
from engine.outputs import ModelRunnerOutput

log = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 10.0  # how long a stopping worker may take before it is killed
_FAILURE_WAIT_S = 3.0  # after a failed step: how long to wait for the watcher to name the dead rank


class EngineDeadError(RuntimeError):
    """A parallel engine's ranks can no longer run steps together; every later step raises it too."""


class WorkerDiedError(EngineDeadError):
    """A worker process of a parallel engine is gone; the engine cannot continue."""

    def __init__(self, rank: int, pid: int | None, exitcode: int | None) -> None:
        self.rank = rank
        how = _describe_exit(exitcode)
        super().__init__(
            f"parallel engine worker rank {rank} (pid {pid}) {how}; the engine has stopped "
            "(its traceback, if it raised, is in this process's stderr)"
        )


class UniprocExecutor:
    """tensor_parallel_size = pipeline_parallel_size = 1: the model runner in this process."""

    def __init__(self, config: EngineConfig, spec: ModelSpec) -> None:
        self.runner = build_runner(config, spec, local_rank=0)
        self.num_blocks = self.runner.allocate_kv_cache()
        self.num_parameters_per_rank = [self.runner.num_parameters()]

    def execute(self, plan: StepPlan) -> ModelRunnerOutput | None:
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    """Rank 0 of tensor_parallel_size * pipeline_parallel_size ranks; the others are worker processes."""

    def __init__(self, config: EngineConfig, spec: ModelSpec) -> None:
        if ps.get_parallel_state().world_size > 1:
            raise RuntimeError("a parallel engine is already running in this process: close() it first")
        self.config = config
        self._failure: EngineDeadError | None = None  # set once: the engine is dead
        self._failed = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        init_method = _init_method()
        self._procs = self._spawn(config, spec, init_method)
        # Runs on close(), or at garbage collection / interpreter exit if close() is never called.
        # It also restores this process's CPU threads, which join_and_load may lower to its share.
        self._finalizer = weakref.finalize(
            self, _release, list(self._procs.values()), torch.get_num_threads()
        )
        self._watcher = threading.Thread(target=self._watch, name="worker-watcher", daemon=True)
        self._watcher.start()
        try:
            self._wait_until_ready()
            self.runner, self.num_blocks, num_parameters = join_and_load(config, spec, 0, 0, init_method)
            self.num_parameters_per_rank: list[int] = num_parameters
            log.info("weights: %s parameters on ranks 0..%d", num_parameters, len(num_parameters) - 1)
        except BaseException as e:
            # A checkpoint that cannot load fails every rank alike: rank 0's own error says why.
            failure = e if isinstance(e, (ModelLoadError, ValueError)) else self._failure_after(e)
            # ranks may be anywhere in start-up: no stop message, just end them
            self._closed = True
            self._stopping.set()
            self._finalizer()
            if failure is e:
                raise
            raise failure from e

    def execute(self, plan: StepPlan) -> ModelRunnerOutput | None:
        """Run one step on every rank; the sampled tokens come back here, on the CPU where remote."""
        self._check_alive()
        state = ps.get_parallel_state()
        remote_sampling = state.sampling_rank != 0
        try:
            ps.broadcast_from_driver(("step", plan if remote_sampling else plan.without_sampling()))
            output = self.runner.execute(plan)
            if remote_sampling:
                output = ps.recv_from(state.sampling_rank)
            return output
        except BaseException as e:  # Ctrl-C mid-step too: the ranks are out of step from here on
            failure = self._fail(e)
            if failure is e:
                raise
            raise failure from e

    @property
    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of each worker process."""
        return {rank: p.pid for rank, p in self._procs.items()}

    def shutdown(self) -> None:
        """Stop the workers and reap them; idempotent. Safe after a failure."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._failure is None and ps.get_parallel_state().world_size > 1:
            try:
                ps.broadcast_from_driver(("stop",))
            except Exception:  # a worker is already gone: the kill below reaps the rest
                log.debug("stop message not delivered", exc_info=True)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for p in self._procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self._finalizer()  # kills whatever is left, reaps it, leaves the world

    def _spawn(self, config, spec: ModelSpec, init_method) -> dict[int, multiprocessing.Process]:
        # Each worker gets rank 0's ModelSpec (the checkpoint's facts and the quantisation plan) in
        # its arguments: no worker reads the checkpoint's config or makes the plan again.
        context = multiprocessing.get_context("spawn")
        self._ready = context.Queue()
        procs = {}
        for rank in range(1, local_world_size_of(config)):
            p = context.Process(
                target=run_worker,
                args=(config, spec, rank, rank, init_method, self._ready),
                name=f"sluice-rank-{rank}",
                daemon=True,
            )
            p.start()
            procs[rank] = p
        return procs

    def _wait_until_ready(self) -> None:
        # Workers spend their start-up importing torch; one that dies there must not leave rank 0
        # waiting in init_process_group (which no dead peer interrupts) until the timeout.
        waiting = set(self._procs)
        deadline = time.monotonic() + self.config.distributed_timeout_s
        while waiting:
            if self._failure is not None:
                raise self._failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker ranks {sorted(waiting)} did not start within the timeout")
            with contextlib.suppress(queue.Empty):
                waiting.discard(self._ready.get(timeout=0.2))
        self._ready.close()

    def _watch(self) -> None:
        if not self._procs:
            return
        by_sentinel = {p.sentinel: rank for rank, p in self._procs.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self._stopping.is_set():
            return
        rank = by_sentinel[ready[0]]
        dead = self._procs[rank]
        dead.join(timeout=1.0)  # exitcode is set once it is reaped
        self._failure = WorkerDiedError(rank, dead.pid, dead.exitcode)
        log.error("%s", self._failure)
        self._failed.set()
        # Rank 0 may be blocked on any peer: closing every connection unblocks it now.
        for p in self._procs.values():
            if p.is_alive():
                p.kill()

    def _fail(self, error: BaseException) -> BaseException:
        """The error to raise for a failed step (Ctrl-C stays itself); the engine is dead from here on."""
        failure = self._failure_after(error)
        if self._failure is None:
            # Not a death but a failed collective, a bug or an interrupt: the ranks are out of
            # step for good, so stop the workers.
            self._failure = EngineDeadError(
                f"a step of the parallel engine failed ({type(error).__name__}: {error}); the engine has stopped"
            )
            self._stopping.set()
            _reap(list(self._procs.values()))
            failure = self._failure if isinstance(error, Exception) else error
        return failure

    def _failure_after(self, error: BaseException) -> BaseException:
        # A collective fails as soon as its peer's socket closes, often before the watcher
        # has seen the process exit: give it a moment to name the rank.
        if isinstance(error, Exception) and self._procs and self._failed.wait(timeout=_FAILURE_WAIT_S):
            return self._failure
        return error

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("the engine is closed")


def _init_method() -> str:
    """MASTER_ADDR / MASTER_PORT when set (multi-node), else a free port on this machine."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return f"tcp://{addr}:{port}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _release(procs: list[multiprocessing.Process], num_threads: int) -> None:
    _reap(procs)
    ps.destroy_parallel_state()
    torch.set_num_threads(num_threads)


def _reap(procs: list[multiprocessing.Process]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=_JOIN_TIMEOUT_S)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
