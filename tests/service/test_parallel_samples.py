"""n and best_of through the JobHandler on the tiny engine: n choices by index, usage over all of
them, seeded samples with seed + index, and vLLM's refusals (greedy n > 1, best_of < n) by name.
(Through Kafka and `sluice batch --local`: tests/service/test_conformance.py.)"""

from __future__ import annotations

import json
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(body: dict, url: str = COMPLETIONS):
        base = (
            {"prompt": "The river is"}
            if url == COMPLETIONS
            else {"messages": [{"role": "user", "content": "Hi"}]}
        )
        job = {"custom_id": "j", "url": url, "body": {**base, "max_tokens": 6, "ignore_eos": True, **body}}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result.response

    yield run
    await engine.stop()


async def test_n_gives_n_choices_indexed_and_usage_counts_every_choices_tokens(handle) -> None:
    response = await handle({"n": 3, "temperature": 1, "seed": 2, "logprobs": 0})
    body = response.body
    assert [c.index for c in body.choices] == [0, 1, 2]
    tokens = sum(len(c.logprobs.tokens) for c in body.choices)
    assert tokens == 18 and body.usage.completion_tokens == 18
    assert body.usage.total_tokens == body.usage.prompt_tokens + 18


async def test_a_seeded_chat_jobs_choice_i_is_the_same_job_with_seed_plus_i(handle) -> None:
    many = await handle({"n": 2, "temperature": 1, "seed": 11}, CHAT)
    alone = [await handle({"temperature": 1, "seed": 11 + i}, CHAT) for i in range(2)]
    texts = [c.message.content for c in many.body.choices]
    assert texts == [r.body.choices[0].message.content for r in alone]


async def test_best_of_returns_n_choices_without_logprobs_unless_asked(handle) -> None:
    response = await handle({"n": 2, "best_of": 4, "temperature": 1, "seed": 1})
    assert response.status_code == 200
    assert [c.index for c in response.body.choices] == [0, 1]
    assert all(c.logprobs is None for c in response.body.choices)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"n": 2, "temperature": 0}, "n", "n must be 1 when using greedy sampling, got 2"),
        ({"best_of": 2, "temperature": 0}, "best_of", "best_of must be 1 when using greedy sampling, got 2"),
        ({"n": 3, "best_of": 2, "temperature": 1}, "best_of", "best_of must be >= n, got n=3 and best_of=2"),
    ],
    ids=["greedy-n", "greedy-best-of", "best-of-below-n"],
)
async def test_vllms_sample_count_rules_refuse_the_job_by_name(handle, body, param, message) -> None:
    response = await handle(body)
    assert response.status_code == 400
    error = response.body.error
    assert (error.param, error.message, error.code) == (param, message, "invalid_request")
