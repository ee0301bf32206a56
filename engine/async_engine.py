"""AsyncLLMEngine: runs the engine's step loop on an engine thread; asyncio awaits one future per request.

The event loop never calls step(): requests go to the engine thread through a thread-safe
queue, and each result comes back on its request's future via call_soon_threadsafe. The
engine thread blocks only when it has nothing to run. Pass the EngineThread that loaded the
engine so that one thread runs all of its torch calls (engine/engine_thread.py says why);
without one the engine gets a thread of its own. If the engine dies for good (a parallel
engine's worker process is gone: EngineDeadError) the thread fails every request and ends: `is_running` turns
False, and later requests fail at once with the same error. A step whose model run fails (out of
memory: StepFailed) has its requests queued again and is retried after a pause, up to
MAX_STEP_RETRIES times in a row; only then are that step's requests failed, and the others go on.
An error raised after the model run by one request's data (the decode of its tokens, its grammar:
RequestFailed) fails that request alone. Any other error of a step fails every request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time

from engine.core.stats import EngineStats
from engine.engine_thread import EngineThread
from engine.executor.executor import EngineDeadError
from engine.llm_engine import LLMEngine, StepFailed
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MAX_STEP_RETRIES = 3  # failed steps in a row before the failing step's requests are failed
STEP_RETRY_DELAY_S = 0.2  # the first pause after a failed step; doubled for each further one


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, thread: EngineThread | None = None) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", [...]) | ("abort", id) | ("stop",)
        self._futures: dict[str, asyncio.Future[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = thread  # None: start() makes one, stop() ends it
        self._owns_thread = thread is None
        self._step_loop: concurrent.futures.Future | None = None  # done when _run returns
        self._dead: EngineDeadError | None = None  # why the engine can run nothing more
        self._dead_lock = threading.Lock()  # orders a request's enqueue against the thread's end
        self._failed_steps = 0  # failed steps in a row

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = EngineThread()
        self._step_loop = self._thread.submit(self._run)
        self._step_loop.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Abort whatever is still running and wait for the step loop to end."""
        if self._step_loop is None:
            return
        self._inbox.put(("stop",))
        await asyncio.wait([asyncio.wrap_future(self._step_loop)])
        self._step_loop = None
        if self._owns_thread and self._thread is not None:
            self._thread.close()
            self._thread = None

    def add_requests(
        self, requests: list[tuple[str, str | list[int], SamplingParams, int]]
    ) -> list[asyncio.Future]:
        """Queue (request_id, prompt, params, priority) requests as one message: the engine adds them all
        before its next step, so they start together. Await each future with wait()."""
        assert self._loop is not None, "start() first"
        futures = []
        with self._dead_lock:  # ordered against the thread's end: no request is left unanswered
            if self._dead is not None:
                raise self._dead
            for request_id, *_ in requests:
                future: asyncio.Future[RequestOutput] = self._loop.create_future()
                self._futures[request_id] = future
                futures.append(future)
            self._inbox.put(("add", requests))
        return futures

    async def wait(self, request_id: str, future: asyncio.Future) -> RequestOutput:
        """The request's output; cancelling the awaiting task aborts the request in the engine."""
        try:
            return await future
        except asyncio.CancelledError:
            self._inbox.put(("abort", request_id))
            raise
        finally:
            self._futures.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request whose future nobody awaits yet (see DynamicBatcher)."""
        self._inbox.put(("abort", request_id))
        self._futures.pop(request_id, None)

    @property
    def is_running(self) -> bool:
        """The step loop is running (liveness)."""
        return self._step_loop is not None and not self._step_loop.done()

    @property
    def tokenizer(self):
        """The engine's tokenizer (thread-safe to read: the engine never changes it)."""
        return self.engine.tokenizer

    @property
    def generation_defaults(self) -> dict[str, float | int]:
        """The checkpoint's sampling defaults (generation_config.json), by SamplingParams field."""
        return self.engine.generation_defaults

    def stats(self) -> EngineStats:
        """The engine's monitoring snapshot (LLMEngine.stats)."""
        return self.engine.stats()

    def _run(self) -> None:
        while True:
            # Block only when there is nothing to step; otherwise drain the inbox and step.
            block = not self.engine.has_unfinished_requests()
            if not self._drain_inbox(block):
                break
            try:
                outputs = self.engine.step()
            except EngineDeadError as e:
                log.error("the engine is gone: %s", e)
                self._end(e)
                return
            except StepFailed as e:
                self._retry_or_fail(e)
                continue
            except Exception as e:
                log.exception("engine step failed; failing its requests")
                self._fail_all(e)
                continue
            self._failed_steps = 0
            for output in outputs:
                self._resolve(output.request_id, output)
            for failure in self.engine.take_failed():  # one request's own data: the others go on
                log.warning("request %s failed in the engine: %s", failure.request_id, failure.cause)
                self._resolve(failure.request_id, failure)
        self._fail_all(RuntimeError("the engine stopped"))

    def _retry_or_fail(self, failure: StepFailed) -> None:
        self._failed_steps += 1
        if self._failed_steps > MAX_STEP_RETRIES:
            log.error(
                "engine step failed %d times in a row (%s): failing its requests",
                MAX_STEP_RETRIES + 1,
                failure,
            )
            for request_id in failure.request_ids:
                self.engine.abort(request_id, report=False)  # answered here, with the failure
                self._resolve(request_id, failure.cause)
            self._failed_steps = 0
            return
        delay = STEP_RETRY_DELAY_S * 2 ** (self._failed_steps - 1)
        log.warning(
            "engine step failed (%s): its %d requests are queued again; retry %d of %d in %.1fs",
            failure,
            len(failure.request_ids),
            self._failed_steps,
            MAX_STEP_RETRIES,
            delay,
        )
        time.sleep(delay)  # the engine thread's own pause: a device short of memory may recover

    def _end(self, error: Exception) -> None:
        with self._dead_lock:
            self._dead = error
        self._fail_all(error)
        self._drain_inbox(block=False)  # adds that raced the failure: fail them too
        self._fail_all(error)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds/aborts; returns False on stop."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            match message:
                case ("add", requests):
                    for request_id, prompt, params, priority in requests:
                        try:
                            self.engine.add_request(request_id, prompt, params, priority)
                        except Exception as e:
                            self._resolve(request_id, e)
                case ("abort", request_id):
                    self.engine.abort(request_id)
                case ("stop",):
                    return False

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._futures):
            self.engine.abort(request_id, report=False)  # answered here, with the error
            self._resolve(request_id, error)

    def _resolve(self, request_id: str, result: RequestOutput | Exception) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_future, self._futures.get(request_id), result)


def _log_crash(step_loop: concurrent.futures.Future) -> None:
    if not step_loop.cancelled() and (error := step_loop.exception()) is not None:
        log.error("the engine's step loop crashed", exc_info=error)


def _set_future(future: asyncio.Future | None, result: RequestOutput | Exception) -> None:
    if future is None or future.done():
        return  # cancelled or already failed
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
