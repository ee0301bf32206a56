"""A job's own `chat_template` through the JobHandler: refused by name unless the operator allows
it; where allowed, a hostile one (a nested loop, a memory bomb) gets an error result naming the
limit within it, while the ordinary jobs beside it are answered; and a stuck tokenizer thread
shows in liveness."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import msgspec
import pytest

from engine import AsyncLLMEngine
from service.app import Service
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.limits import JobLimits
from tests.service.test_template_sandbox import MEMORY_BOMB, NESTED_LOOP

TIMEOUT_S = 1.0
OWN_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def _job(custom_id: str, template: str | None = None) -> bytes:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    if template is not None:
        body["chat_template"] = template
    return json.dumps({"custom_id": custom_id, "url": "/v1/chat/completions", "body": body}).encode()


@pytest.fixture
async def make_handler(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handlers: list[JobHandler] = []

    def make(**limits) -> JobHandler:
        config = ServiceConfig(model_name="tiny", default_max_tokens=8, limits=JobLimits(**limits))
        handler = JobHandler(config, DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1), tiny_engine)
        handlers.append(handler)
        return handler

    yield make
    for handler in handlers:
        await handler.stop()
    await engine.stop()


async def test_a_jobs_own_chat_template_is_refused_by_name_unless_the_operator_allows_it(make_handler):
    refused = await make_handler().handle(_job("own", OWN_TEMPLATE), [], 0, "jobs/0/1")
    error = refused.result.response.body.error
    assert (refused.result.response.status_code, error.code, error.param) == (
        400,
        "unsupported_parameter",
        "chat_template",
    )
    assert "allow_job_chat_template" in error.message

    allowed = await make_handler(allow_job_chat_template=True).handle(
        _job("own", OWN_TEMPLATE), [], 0, "j/0/1"
    )
    assert allowed.result.response.status_code == 200
    assert allowed.output.prompt_token_ids  # rendered by the job's template, in the sandbox


@pytest.mark.parametrize(
    ("template", "limit"),
    [(NESTED_LOOP, "took longer than"), (MEMORY_BOMB, "needed more than")],
    ids=["nested-loop", "memory-bomb"],
)
async def test_a_hostile_template_gets_an_error_naming_its_limit_while_ordinary_jobs_are_answered(
    make_handler, template, limit
):
    handler = make_handler(allow_job_chat_template=True, chat_template_timeout_s=TIMEOUT_S)
    await handler.start()  # the sandbox's workers are up: the times below are the renders' own
    finished: dict[str, float] = {}
    started = time.monotonic()

    async def run(custom_id: str, value: bytes):
        outcome = await handler.handle(value, [], 0, f"jobs/0/{custom_id}")
        finished[custom_id] = time.monotonic() - started
        return outcome

    hostile, *ordinary = await asyncio.gather(
        run("hostile", _job("hostile", template)),
        run("model-template", _job("model-template")),
        run("own-template", _job("own-template", OWN_TEMPLATE)),
    )
    error = hostile.result.response.body.error
    assert (error.code, error.param) == ("limit_exceeded", "chat_template")
    assert f"the render {limit} this service's limit" in error.message
    assert finished["hostile"] < TIMEOUT_S + 1.0
    assert [o.result.response.status_code for o in ordinary] == [200, 200]
    if template == NESTED_LOOP:  # the jobs beside it did not wait for its render
        assert finished["model-template"] < finished["hostile"]
        assert finished["own-template"] < finished["hostile"]


async def test_liveness_fails_while_a_task_holds_the_tokenizer_thread(service_config, tiny_engine):
    config = msgspec.structs.replace(service_config, tokenizer_stall_s=0.2)
    service = Service(config, tiny_engine)
    service.async_engine.start()
    release = threading.Event()
    try:
        assert service.is_live()
        stuck = asyncio.ensure_future(service.handler._off_loop(release.wait, 30))
        await asyncio.sleep(0.5)
        assert not service.is_live()
        release.set()
        await stuck
        assert service.is_live()
    finally:
        release.set()
        await service.handler.stop()
        await service.async_engine.stop()
