"""JobHandler: a deadline that passes during inference aborts the request (in-memory engine double)."""

from __future__ import annotations

import asyncio
import json
import time

from service.config import ServiceConfig
from service.jobs import JobHandler


class _SlowEngine:
    """Stands in for DynamicBatcher: never finishes, records whether it was cancelled (= aborted)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.generation_defaults = {}
        self.cancelled = False

    async def generate(self, request_id, prompt, params, priority=0, tag=None):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def _job(body: dict) -> bytes:
    return json.dumps({"custom_id": "slow", "url": "/v1/completions", "body": body}).encode()


async def test_a_deadline_passing_during_inference_aborts_the_request(tiny_engine):
    slow = _SlowEngine(tiny_engine.tokenizer)
    handler = JobHandler(ServiceConfig(model_name="tiny", default_max_tokens=8), slow, tiny_engine)
    deadline_ms = int((time.time() + 0.3) * 1000)
    started = time.monotonic()
    job = _job({"prompt": "hello", "sluice_deadline_ms": deadline_ms})
    outcome = await handler.handle(job, [], int(time.time() * 1000), "jobs/0/7")
    assert time.monotonic() - started < 5
    # not an HTTP error: no response, the top-level error (OpenAI's batch_expired shape)
    assert outcome.result.error.code == "deadline_exceeded"
    assert "during inference" in outcome.result.error.message
    assert outcome.result.response is None
    assert slow.cancelled
