"""Constrained jobs through the JobHandler and through the real broker: choice probabilities out, bad specs as errors."""

from __future__ import annotations

import json
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from schemas.codec import decode_result
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler

LABELS = ["positive", "negative", "neutral"]


def _handle(handler: JobHandler, body: dict, url: str = "/v1/completions", custom_id: str = "job-1"):
    value = json.dumps({"custom_id": custom_id, "url": url, "body": body}).encode()
    return handler.handle(value, [], int(time.time() * 1000), "jobs/0/7")


@pytest.fixture
async def handler(tiny_engine):
    async_engine = AsyncLLMEngine(tiny_engine)
    async_engine.start()
    yield JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=16),
        DynamicBatcher(async_engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )
    await async_engine.stop()


async def test_a_choice_job_answers_one_of_the_choices_with_their_probabilities(handler) -> None:
    body = {"prompt": "The river is cold today", "guided_choice": LABELS, "temperature": 0}
    outcome = await _handle(handler, body)
    assert not outcome.is_error
    result = outcome.result.response.body
    assert result.choices[0].text in LABELS
    probabilities = result.sluice.choice_probabilities
    assert set(probabilities) == set(LABELS)
    assert sum(probabilities.values()) == pytest.approx(1.0)


async def test_a_json_schema_job_through_response_format_returns_valid_json(handler) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "Is the river cold?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        "max_tokens": 32,
    }
    outcome = await _handle(handler, body, url="/v1/chat/completions")
    assert not outcome.is_error
    content = outcome.result.response.body.choices[0].message.content
    assert isinstance(json.loads(content)["ok"], bool)
    assert outcome.result.response.body.sluice.choice_probabilities is None


@pytest.mark.parametrize(
    ("constraint", "code", "message"),
    [
        ({"guided_regex": "a(("}, "invalid_structured_output", "invalid regex"),
        (
            {"structured_outputs": {"json": {"type": "objectx"}}},
            "invalid_structured_output",
            "invalid JSON schema",
        ),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "invalid_request", "at most one"),
    ],
    ids=["bad-regex", "bad-schema", "two-constraints"],
)
async def test_an_invalid_regex_schema_or_two_constraints_is_an_error_result_not_a_crash(
    handler, constraint, code, message
) -> None:
    outcome = await _handle(handler, {"prompt": "Hello", **constraint})
    assert outcome.is_error
    assert outcome.result.response.status_code == 400
    assert outcome.result.failure.code == code
    assert message in outcome.result.failure.message
    # the engine is still serving
    assert not (await _handle(handler, {"prompt": "Hello", "max_tokens": 2})).is_error


@pytest.mark.kafka
async def test_a_choice_job_through_the_broker_returns_choice_probabilities(
    kafka, service_config, run_service
):
    jobs = [
        {
            "custom_id": f"label-{i}",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": f"Review {i}: the river is cold. Sentiment?"}],
                "structured_outputs": {"choice": LABELS},
                "temperature": 0,
            },
        }
        for i in range(3)
    ]
    await kafka.post(
        service_config.jobs_topics[0], [(j["custom_id"].encode(), json.dumps(j).encode(), []) for j in jobs]
    )
    async with run_service(service_config):
        records = await kafka.read(service_config.results_topic, len(jobs))
    for record in records:
        raw = json.loads(record.value)
        probabilities = raw["response"]["body"]["sluice"]["choice_probabilities"]
        assert set(probabilities) == set(LABELS)
        assert sum(probabilities.values()) == pytest.approx(1.0)
        result = decode_result(record.value)
        assert result.error is None
        assert result.response.body.choices[0].message.content in LABELS
