"""TemplateSandbox: a job's own chat template renders as Transformers renders it, in a worker
process, and a render past its time, memory or output limit is the job's error naming the limit;
its worker is killed and replaced, and stopping the sandbox never waits for a render."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.prompts import ChatInputs, PromptError
from service.template_sandbox import TemplateSandbox

TIMEOUT_S = 0.5
MEMORY = 64 * 2**20
MAX_CHARS = 100_000

NESTED_LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
# doubles a string 64 times: 2^64 characters if nothing stopped it
MEMORY_BOMB = (
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
)
OUTPUT_BOMB = "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}"
PLAIN = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
async def sandbox():
    sandbox = TemplateSandbox(1, TIMEOUT_S, MEMORY, MAX_CHARS)
    yield sandbox
    await sandbox.stop()


def _chat(template: str, **inputs) -> ChatInputs:
    return ChatInputs(
        template=template,
        messages=inputs.pop("messages", [{"role": "user", "content": "hi"}]),
        tools=inputs.pop("tools", None),
        documents=inputs.pop("documents", None),
        variables=inputs.pop("variables", {}),
        add_generation_prompt=inputs.pop("add_generation_prompt", True),
        continue_final_message=inputs.pop("continue_final_message", False),
    )


async def _limit_error(sandbox: TemplateSandbox, template: str) -> tuple[PromptError, float]:
    await sandbox.render(_chat(PLAIN), {})  # a started worker: the time below is the render's own
    started = time.monotonic()
    with pytest.raises(PromptError) as info:
        await sandbox.render(_chat(template), {})
    return info.value, time.monotonic() - started


async def test_a_template_renders_as_transformers_renders_it(sandbox, tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{{ tools | tojson }}{{ documents | tojson }}{% if flavour %}{{ flavour }}{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, the"}]
    inputs = dict(
        messages=messages,
        tools=[{"type": "function", "function": {"name": "f", "description": "é"}}],
        documents=[{"title": "t", "text": "d"}],
        variables={"flavour": "salt"},
        add_generation_prompt=False,
        continue_final_message=True,
    )
    chat = _chat(template, **inputs)
    rendered = await sandbox.render(chat, tokenizer.special_tokens_map)
    assert rendered == tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, **chat.template_kwargs()
    )
    assert rendered.startswith("<s><|user|>hi</s><|assistant|>Well, the")


async def test_a_nested_loop_is_stopped_at_the_time_limit_and_its_worker_replaced(sandbox) -> None:
    error, elapsed = await _limit_error(sandbox, NESTED_LOOP)
    assert (error.code, error.param) == ("limit_exceeded", "chat_template")
    assert error.message == (
        "chat_template: the render took longer than this service's limit of 0.5s (chat_template_timeout_s)"
    )
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0
    assert sandbox.num_killed == 1
    assert await sandbox.render(_chat(PLAIN), {"bos_token": "<s>"}) == "<s><user>hi"  # a new worker
    assert len(sandbox._workers) == 1


async def test_a_memory_bomb_is_stopped_at_the_memory_limit_and_its_worker_replaced(sandbox) -> None:
    error, elapsed = await _limit_error(sandbox, MEMORY_BOMB)
    assert (error.code, error.param) == ("limit_exceeded", "chat_template")
    assert "needed more than this service's limit of 67108864 bytes of memory" in error.message
    assert elapsed < TIMEOUT_S
    assert sandbox.num_killed == 1
    assert await sandbox.render(_chat(PLAIN), {}) == "<user>hi"


async def test_a_render_writing_more_than_the_output_limit_is_stopped(sandbox) -> None:
    error, elapsed = await _limit_error(sandbox, OUTPUT_BOMB)
    assert (error.code, error.param) == ("limit_exceeded", "chat_template")
    assert "wrote more than this service's limit of 100000 characters" in error.message
    assert elapsed < TIMEOUT_S


@pytest.mark.parametrize(
    "template",
    ["{{ raise_exception('no system messages') }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"],
    ids=["raised", "escape"],
)
async def test_a_template_that_fails_or_breaks_the_sandbox_rules_is_an_invalid_request(
    sandbox, template
) -> None:
    with pytest.raises(PromptError) as info:
        await sandbox.render(_chat(template), {})
    assert info.value.code == "invalid_request"
    assert info.value.message.startswith("the chat template rejected the messages:")
    assert sandbox.num_killed == 0


async def test_a_stuck_render_does_not_hold_the_other_worker() -> None:
    sandbox = TemplateSandbox(2, 30.0, MEMORY, MAX_CHARS)
    await sandbox.start()
    try:
        stuck = asyncio.create_task(sandbox.render(_chat(NESTED_LOOP), {}))
        assert await sandbox.render(_chat(PLAIN), {}) == "<user>hi"
        assert not stuck.done()
    finally:
        await sandbox.stop()
    with pytest.raises(PromptError):
        await stuck


async def test_stop_ends_a_stuck_render_at_once() -> None:
    sandbox = TemplateSandbox(1, 3600.0, MEMORY, MAX_CHARS)
    await sandbox.render(_chat(PLAIN), {})
    stuck = asyncio.create_task(sandbox.render(_chat(NESTED_LOOP), {}))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await sandbox.stop()
    with pytest.raises(PromptError):
        await stuck
    assert time.monotonic() - started < 2.0


async def test_a_cancelled_render_kills_its_worker(sandbox) -> None:
    await sandbox.render(_chat(PLAIN), {})
    stuck = asyncio.create_task(sandbox.render(_chat(NESTED_LOOP), {}))
    await asyncio.sleep(0.1)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert sandbox.num_killed == 1
    assert await sandbox.render(_chat(PLAIN), {}) == "<user>hi"


async def test_a_worker_sees_none_of_the_services_secrets_and_may_start_no_process(
    sandbox, monkeypatch
) -> None:
    monkeypatch.setenv("SLUICE_KAFKA_SASL_PASSWORD", "hunter2")
    await sandbox.start()
    (worker,) = sandbox._workers
    environ = Path(f"/proc/{worker.process.pid}/environ").read_bytes()
    assert b"hunter2" not in environ and b"SLUICE_" not in environ
    limits = Path(f"/proc/{worker.process.pid}/limits").read_text()
    assert re.search(r"Max processes\s+0\s+0", limits)
    address_space = re.search(r"Max address space\s+(\d+)", limits)
    assert address_space and int(address_space[1]) < 4 * 2**30


async def test_stop_ends_the_renders_waiting_for_a_worker_to_start() -> None:
    sandbox = TemplateSandbox(1, 30.0, MEMORY, MAX_CHARS)
    waiting = asyncio.create_task(sandbox.render(_chat(PLAIN), {}))
    await asyncio.sleep(0.05)  # its worker is starting
    await sandbox.stop()
    with pytest.raises(RuntimeError, match="the template sandbox is stopped"):
        await waiting
    assert not sandbox._workers
