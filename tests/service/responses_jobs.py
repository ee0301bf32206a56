"""Running `/v1/responses` jobs through the JobHandler on the tiny engine, for the Responses tests
(test_responses_api.py, test_responses_refusals.py): each 200 body is checked against OpenAI's
own Response type."""

from __future__ import annotations

import contextlib
import json
import time

import msgspec

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from tests.service.openai_types import check_body

RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
OK = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "f", "description": "says whether it is ok", "parameters": OK}


def job_handler(engine, async_engine: AsyncLLMEngine, config: ServiceConfig | None = None) -> JobHandler:
    config = config or ServiceConfig(model_name="tiny", default_max_tokens=8)
    return JobHandler(config, DynamicBatcher(async_engine, max_batch_size=8, max_wait_ms=1), engine)


def runner(handler: JobHandler):
    async def run(body: dict, url: str = RESPONSES) -> dict:
        """The job's response (status and body as JSON); a 200 Response is checked against OpenAI's type."""
        job = {"custom_id": "r", "url": url, "body": body}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        response = msgspec.to_builtins(outcome.result.response)
        if response["status_code"] == 200:
            check_body(url, response["body"])
        return response

    return run


@contextlib.asynccontextmanager
async def running(engine, config: ServiceConfig | None = None):
    """A job runner on `engine` while the block lasts: `await run(body)` gives the job's response."""
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    try:
        yield runner(job_handler(engine, async_engine, config))
    finally:
        await async_engine.stop()
