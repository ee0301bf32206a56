"""DynamicBatcher: admits jobs into the engine's continuous batch in groups.

The engine adds whatever is queued before each step, so jobs that reach it one by one while
it is idle start one by one: the first job's prefill runs alone and the others wait a whole
step. The batcher holds admissions until `max_batch_size` jobs are pending or `max_wait_ms`
has passed since the first of them, then hands them to the engine as one message, so a burst
starts in one step. When the engine is busy the wait costs nothing (new jobs wait for the
next step anyway); when it is idle it costs at most `max_wait_ms` of latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import AsyncLLMEngine, RequestOutput, SamplingParams


@dataclass(slots=True)
class Admission:
    request_id: str
    prompt: list[int] | str
    params: SamplingParams
    priority: int
    future: asyncio.Future  # resolved with the engine's future once flushed
    tag: Any = None  # the caller's (a job span, for the batch span's links)


class DynamicBatcher:
    def __init__(
        self,
        async_engine: AsyncLLMEngine,
        max_batch_size: int,
        max_wait_ms: float,
        on_flush: Callable[[list[Admission]], None] | None = None,
    ) -> None:
        self.async_engine = async_engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._on_flush = on_flush  # told about each batch as it goes (spans, metrics)
        self._pending: list[Admission] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def tokenizer(self):
        return self.async_engine.tokenizer

    @property
    def generation_defaults(self) -> dict[str, float | int]:
        return self.async_engine.generation_defaults

    async def generate(
        self,
        request_id: str,
        prompt: list[int] | str,
        params: SamplingParams,
        priority: int = 0,
        tag: Any = None,
    ) -> RequestOutput:
        """The request's output once it finishes: admitted with the next batch (AsyncLLMEngine.add_requests,
        then AsyncLLMEngine.wait); cancelling aborts it."""
        loop = asyncio.get_running_loop()
        admission = Admission(request_id, prompt, params, priority, loop.create_future(), tag)
        self._pending.append(admission)
        if len(self._pending) >= self.max_batch_size:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self.flush)
        try:
            engine_future = await asyncio.shield(admission.future)
        except asyncio.CancelledError:
            if admission in self._pending:
                self._pending.remove(admission)  # never reached the engine: nothing to abort
            elif admission.future.done() and not admission.future.cancelled():
                self.async_engine.abort(request_id)
            raise
        return await self.async_engine.wait(request_id, engine_future)

    def flush(self) -> None:
        """Hand every pending admission to the engine now, as one batch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            futures = self.async_engine.add_requests(
                [(a.request_id, a.prompt, a.params, a.priority) for a in batch]
            )
        except Exception as e:  # the engine is gone (EngineDeadError): every job of the batch hears it
            for admission in batch:
                if not admission.future.done():
                    admission.future.set_exception(e)
            return
        for admission, future in zip(batch, futures, strict=True):
            admission.future.set_result(future)
        if self._on_flush is not None:
            self._on_flush(batch)
