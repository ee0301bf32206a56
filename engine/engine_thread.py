"""EngineThread: one long-lived thread that runs every torch call of an engine (load, steps, offline runs).

Why one thread: torch parallelises CPU ops with OpenMP (libgomp here), and libgomp gives every
thread that runs a parallel op its own pool of worker threads, kept until that thread ends.
Loading a model on one thread (say asyncio's default executor) and stepping it on another
leaves two pools; once a process holds more OpenMP threads than CPUs, libgomp cuts the time an
idle worker spins from about 3 ms to 100 iterations. The workers then sleep between parallel
ops and every op waits for a futex wake-up: on the 2-core dev machine a bfloat16 engine
stepped from a second thread left a quarter of the CPU idle, and the service ran at 0.80 of
the offline engine against 0.89-0.97 with one thread (loadtest/RESULTS.md).

Calls run one at a time in submission order; AsyncLLMEngine's step loop holds the thread until
the engine is stopped, so offline work on the same engine goes before start() or after stop().
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self, name: str = "engine") -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # (future, fn, args, kwargs) | None to end
        # A daemon: a step loop blocked on its inbox must not keep the interpreter from exiting.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue fn(*args, **kwargs) to run on the thread; its result or exception lands on the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run fn on the thread and wait for it (inline when already on the thread)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run fn on the thread without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """End the thread after the calls already queued."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the caller sees it; the thread goes on serving
                future.set_exception(e)
