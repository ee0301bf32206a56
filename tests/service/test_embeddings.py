"""/v1/embeddings jobs through the JobHandler on the tiny engine: each input kind, unit vectors
equal to the engine's pooled hidden state, `dimensions` cut then renormalised, base64, usage,
and refusals by name. (Through Kafka and `sluice batch --local`: tests/service/test_conformance.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler

TEXT = "The river is cold today"


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(body: dict):
        job = {"custom_id": "e", "url": "/v1/embeddings", "body": body}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result.response

    yield run
    await engine.stop()


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


async def test_a_text_input_is_a_unit_vector_the_same_as_its_token_ids(handle, tiny_engine) -> None:
    response = await handle({"input": TEXT})
    assert response.status_code == 200
    (item,) = response.body.data
    ids = tiny_engine.tokenizer.encode(TEXT)
    assert len(item.embedding) == tiny_engine.runner.model.config.hidden_size
    assert math.fsum(x * x for x in item.embedding) == pytest.approx(1.0)
    as_ids = (await handle({"input": ids})).body.data[0].embedding
    assert as_ids == pytest.approx(item.embedding, abs=1e-6)
    assert response.body.usage.prompt_tokens == response.body.usage.total_tokens == len(ids)


@pytest.mark.parametrize(
    ("value", "count"),
    [(["a b", "c"], 2), ([5, 6, 7], 1), ([[5, 6], [7, 8, 9], [4]], 3)],
    ids=["strings", "token-ids", "token-id-lists"],
)
async def test_each_input_kind_gives_one_vector_per_input_by_index(handle, value, count) -> None:
    response = await handle({"input": value})
    assert [d.index for d in response.body.data] == list(range(count))


async def test_dimensions_cut_the_vector_then_renormalise_it_and_base64_carries_float32(handle) -> None:
    full = (await handle({"input": [5, 6, 7]})).body.data[0].embedding
    short = (await handle({"input": [5, 6, 7], "dimensions": 8, "encoding_format": "base64"})).body.data[0]
    values = struct.unpack("<8f", base64.b64decode(short.embedding))
    assert list(values) == pytest.approx(_unit(full[:8]), abs=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [5, 6], "dimensions": 100000}, "dimensions"),
        ({"input": [[5], "x"]}, "input"),
        ({"input": [[5], [6.5]]}, "input[1]"),
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
    ],
    ids=["dimensions-too-large", "mixed-kinds", "float-id", "empty-text", "no-inputs"],
)
async def test_bad_embedding_jobs_are_a_400_naming_the_field(handle, body, param) -> None:
    response = await handle(body)
    assert (response.status_code, response.body.error.param) == (400, param)


async def test_embedding_pooling_mean_pools_every_position(tiny_engine, handle) -> None:
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    batcher = DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1)
    mean = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8, embedding_pooling="mean"), batcher, tiny_engine
    )
    job = json.dumps({"custom_id": "m", "url": "/v1/embeddings", "body": {"input": [5, 6, 7]}}).encode()
    outcome = await mean.handle(job, [], int(time.time() * 1000), "jobs/0/2")
    await engine.stop()
    last = (await handle({"input": [5, 6, 7]})).body.data[0].embedding
    vector = outcome.result.response.body.data[0].embedding
    assert math.fsum(x * x for x in vector) == pytest.approx(1.0)
    assert vector != pytest.approx(last, abs=1e-3)


async def test_embedding_and_generation_jobs_run_together_in_one_engine_as_each_alone(tiny_engine) -> None:
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=20),
        tiny_engine,
    )
    embed = {"custom_id": "e", "url": "/v1/embeddings", "body": {"input": [TEXT, "a b"]}}
    generate = {"custom_id": "g", "url": "/v1/completions", "body": {"prompt": TEXT, "temperature": 0}}

    async def run(*jobs):
        now = int(time.time() * 1000)
        outcomes = await asyncio.gather(
            *(handler.handle(json.dumps(job).encode(), [], now, f"jobs/0/{i}") for i, job in enumerate(jobs))
        )
        return [outcome.result.response.body for outcome in outcomes]

    try:
        together = await run(embed, generate)  # one admission batch: both in the engine at once
        (alone_embedding,), (alone_text,) = await run(embed), await run(generate)
    finally:
        await engine.stop()
    for mixed, alone in zip(together[0].data, alone_embedding.data, strict=True):
        assert mixed.embedding == pytest.approx(alone.embedding, abs=1e-5)
    assert together[1].choices[0].text == alone_text.choices[0].text
