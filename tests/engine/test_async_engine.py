"""AsyncLLMEngine: the step loop on its own thread, one awaitable per request, never blocking asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineThread,
    LLMEngine,
    RequestFailed,
    RequestRejected,
    SamplingParams,
)
from engine.async_engine import MAX_STEP_RETRIES
from tests.engine.async_requests import generate
from tests.engine.loop_ticks import loop_ticks


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=64))


async def test_concurrent_requests_each_get_their_own_result(engine):
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
        outputs = await asyncio.gather(
            *(generate(async_engine, f"r{i}", [1, 10 + i, 20], p) for i, p in enumerate(params))
        )
    finally:
        await async_engine.stop()
    assert [o.request_id for o in outputs] == ["r0", "r1", "r2"]
    assert [len(o.token_ids) for o in outputs] == [3, 9, 5]


async def test_the_event_loop_keeps_running_while_the_engine_works(engine):
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        async with loop_ticks() as ticks:
            await generate(
                async_engine,
                "long",
                [1, 5, 6],
                SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
            )
    finally:
        await async_engine.stop()
    assert ticks.count > 5


async def test_a_rejected_request_raises_in_the_awaiting_coroutine(engine):
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        with pytest.raises(RequestRejected, match="at most 63"):
            await generate(async_engine, "too-long", list(range(5, 100)), SamplingParams(max_tokens=4))
    finally:
        await async_engine.stop()


async def test_cancelling_the_awaiting_task_aborts_the_request_and_frees_its_blocks(engine):
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        task = asyncio.create_task(
            generate(async_engine, "cancel-me", [1, 5, 6], SamplingParams(max_tokens=60, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the engine thread applies the abort before its next step; a short request after it completes
        await generate(async_engine, "after", [1, 7], SamplingParams(temperature=0.0, max_tokens=2))
    finally:
        await async_engine.stop()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def test_the_step_loop_runs_on_the_engine_thread_it_is_given_which_outlives_stop(engine):
    # The thread that loaded the engine steps it too: one OpenMP pool (engine/engine_thread.py).
    engine_thread = EngineThread()
    step_threads = set()
    step = engine.step

    def recording_step():
        step_threads.add(threading.get_ident())
        return step()

    engine.step = recording_step
    async_engine = AsyncLLMEngine(engine, engine_thread)
    try:
        async_engine.start()
        assert async_engine.is_running
        await generate(
            async_engine, "r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        )
        await async_engine.stop()
        assert not async_engine.is_running
        assert step_threads == {engine_thread.ident}
        # Offline work goes on the same thread once the step loop has stopped.
        outputs = engine_thread.call(
            engine.generate, [[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        )
        assert len(outputs[0].token_ids) == 2
    finally:
        del engine.step
        engine_thread.close()


class _FailingModelRuns:
    """The engine's executor with its first `times` model runs raising (as out of memory would)."""

    def __init__(self, engine: LLMEngine, times: int) -> None:
        self.engine, self.times, self.calls = engine, times, 0
        self._execute = engine.executor.execute

    def __enter__(self):
        def execute(plan):
            self.calls += 1
            if self.calls <= self.times:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self._execute(plan)

        self.engine.executor.execute = execute
        return self

    def __exit__(self, *exc_info) -> None:
        del self.engine.executor.execute


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


async def _generate_all(engine: LLMEngine, prompts: list[list[int]]) -> list:
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        return await asyncio.gather(
            *(generate(async_engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)),
            return_exceptions=True,
        )
    finally:
        await async_engine.stop()


async def test_a_step_that_runs_out_of_memory_is_retried_and_its_requests_finish_unchanged(engine):
    prompts = [[1, 10 + i, 20] for i in range(3)]
    expected = await _generate_all(engine, prompts)
    with _FailingModelRuns(engine, times=2) as failing:
        outputs = await _generate_all(engine, prompts)
    assert failing.calls > 2
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def test_a_step_that_keeps_failing_fails_its_own_requests_after_the_retries(engine, monkeypatch):
    monkeypatch.setattr("engine.async_engine.STEP_RETRY_DELAY_S", 0.01)
    with _FailingModelRuns(engine, times=1 + MAX_STEP_RETRIES) as failing:
        (output,) = await _generate_all(engine, [[1, 2, 3]])
    assert isinstance(output, torch.OutOfMemoryError)
    assert failing.calls == 1 + MAX_STEP_RETRIES
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def test_a_decode_that_raises_for_one_request_fails_that_request_alone(engine, monkeypatch):
    # Three requests that start in the same step; their outputs differ in length, so the faulty
    # decode below matches the middle request's tokens only.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
    requests = [(f"r{i}", [1, 10 + i, 20], p, 0) for i, p in enumerate(params)]
    expected = await _generate_together(engine, requests)
    faulty_tokens = expected[1].token_ids
    decode = engine.tokenizer.decode

    def decode_failing_for_one_request(token_ids, *args, **kwargs):
        if list(token_ids) == faulty_tokens:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return decode(token_ids, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", decode_failing_for_one_request)
    outputs = await _generate_together(engine, requests)

    assert isinstance(outputs[1], RequestFailed)
    assert "'r1'" in str(outputs[1]) and "UnicodeDecodeError" in str(outputs[1])
    assert outputs[1].__cause__ is outputs[1].cause  # its traceback is logged with the error
    assert outputs[1].cause.__traceback__ is not None
    for output, want in zip([outputs[0], outputs[2]], [expected[0], expected[2]], strict=True):
        assert (output.request_id, output.token_ids, output.text, output.finish_reason) == (
            want.request_id,
            want.token_ids,
            want.text,
            "length",
        )
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_offline_generate_finishes_the_others_before_raising_a_request_failure(engine, monkeypatch):

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 5)]
    decode = engine.tokenizer.decode

    def decode_failing_for_five_tokens(token_ids, *args, **kwargs):
        if len(token_ids) == 5:
            raise ValueError("no such token")
        return decode(token_ids, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", decode_failing_for_five_tokens)
    with pytest.raises(RequestFailed, match="ValueError: no such token"):
        engine.generate([[1, 2, 3], [1, 2, 4]], params, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def _generate_together(engine: LLMEngine, requests: list[tuple]) -> list:
    """The requests added as one message (they start in the same step); outputs or errors in order."""
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        futures = async_engine.add_requests(requests)
        return await asyncio.gather(
            *(async_engine.wait(r[0], f) for r, f in zip(requests, futures, strict=True)),
            return_exceptions=True,
        )
    finally:
        await async_engine.stop()
