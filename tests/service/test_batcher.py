"""DynamicBatcher: jobs reach the engine in groups, flushed on size or on the maximum wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import AsyncLLMEngine, SamplingParams
from service.batcher import DynamicBatcher
from tests.engine.async_requests import generate

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture
async def async_engine(tiny_engine):
    async_engine = AsyncLLMEngine(tiny_engine)
    async_engine.start()
    yield async_engine
    await async_engine.stop()


def _recording_batcher(async_engine, max_batch_size: int, max_wait_ms: float):
    flushes: list[tuple[float, list[str]]] = []
    batcher = DynamicBatcher(
        async_engine,
        max_batch_size,
        max_wait_ms,
        on_flush=lambda batch: flushes.append((time.monotonic(), [a.request_id for a in batch])),
    )
    return batcher, flushes


async def test_jobs_arriving_together_go_to_the_engine_as_one_batch_after_the_wait(async_engine):
    batcher, flushes = _recording_batcher(async_engine, max_batch_size=32, max_wait_ms=50)
    started = time.monotonic()
    outputs = await asyncio.gather(*(batcher.generate(f"r{i}", [1, 7 + i, 9], GREEDY) for i in range(5)))
    assert [ids for _, ids in flushes] == [["r0", "r1", "r2", "r3", "r4"]]
    assert flushes[0][0] - started >= 0.045  # held for the maximum wait: nothing more came
    expected = [await generate(async_engine, f"direct-{i}", [1, 7 + i, 9], GREEDY) for i in range(5)]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]


async def test_a_full_batch_flushes_at_once_and_the_rest_after_the_wait(async_engine):
    batcher, flushes = _recording_batcher(async_engine, max_batch_size=3, max_wait_ms=10_000)
    tasks = [asyncio.create_task(batcher.generate(f"r{i}", [1, 2, 3], GREEDY)) for i in range(7)]
    await asyncio.sleep(0.2)
    assert [ids for _, ids in flushes] == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]
    assert not tasks[6].done()  # alone, waiting for more jobs or the 10 s wait
    batcher.flush()
    await asyncio.gather(*tasks)
    assert [ids for _, ids in flushes][-1] == ["r6"]


async def test_cancelling_a_job_before_or_after_its_flush_leaves_nothing_in_the_engine(
    async_engine, tiny_engine
):
    batcher, flushes = _recording_batcher(async_engine, max_batch_size=32, max_wait_ms=10_000)
    waiting = asyncio.create_task(batcher.generate("never-flushed", [1, 2, 3], GREEDY))
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    batcher.flush()
    assert flushes == []  # the cancelled job never reached the engine

    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    running = asyncio.create_task(batcher.generate("aborted", [1, 2, 3], long))
    await asyncio.sleep(0.05)
    batcher.flush()
    await asyncio.sleep(0.2)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    for _ in range(50):
        if not tiny_engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.05)
    assert not tiny_engine.has_unfinished_requests()
