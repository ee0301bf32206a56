"""Sampling and prompt fields do what OpenAI and vLLM say, through the JobHandler on the tiny engine:
the truncations and penalties, the checkpoint's generation_config.json defaults, message fields
and template variables reaching the chat template, and logprob bytes that are the token's own.
"""

from __future__ import annotations

import json
import time

import pytest

from engine import EngineConfig, LLMEngine
from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.limits import JobLimits
from service.logprobs import token_bytes

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT = "The river is cold today, and"
# a template that shows the message fields and template variables it is given
SHOW_ALL = (
    "{% for m in messages %}[{{ m.role }}|{{ m.name }}|{{ m.tool_call_id }}|"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}{% endfor %}]{{ m.content }}{% endfor %}"
    "{% for d in documents or [] %}<{{ d.title }}>{% endfor %}{{ flavour }}"
)


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(
            model_name="tiny", default_max_tokens=8, limits=JobLimits(allow_job_chat_template=True)
        ),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(body: dict, url: str = COMPLETIONS):
        base = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True} if url == COMPLETIONS else {}
        body = {name: value for name, value in {**base, **body}.items() if value is not None}  # None: unset
        job = {"custom_id": "j", "url": url, "body": body}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        assert outcome.result.response.status_code == 200, outcome.result.response.body
        return outcome.result.response.body

    yield run
    await handler.stop()
    await engine.stop()


async def _token_ids(handle, body: dict) -> list[int]:
    result = await handle({**body, "logprobs": 0, "return_tokens_as_token_ids": True})
    return [int(token.removeprefix("token_id:")) for token in result.choices[0].logprobs.tokens]


@pytest.mark.parametrize(
    "cut", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}], ids=["top_k", "top_p", "min_p"]
)
async def test_a_sampled_job_cut_to_its_most_probable_token_is_the_greedy_job(handle, cut) -> None:
    greedy = await _token_ids(handle, {"temperature": 0})
    assert await _token_ids(handle, {"temperature": 1.0, "seed": 1, **cut}) == greedy
    assert await _token_ids(handle, {"temperature": 1.0, "seed": 1}) != greedy  # the cut did it


async def test_the_same_seed_gives_the_same_sample_and_another_seed_another(handle) -> None:
    first = await _token_ids(handle, {"seed": 1})
    assert await _token_ids(handle, {"seed": 1}) == first
    assert await _token_ids(handle, {"seed": 2}) != first


@pytest.mark.parametrize(
    "penalty",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.5}],
    ids=["presence", "frequency", "repetition"],
)
async def test_a_penalty_keeps_a_greedy_output_from_repeating_its_tokens(handle, penalty) -> None:
    plain = await _token_ids(handle, {"temperature": 0})
    assert len(set(plain)) < len(plain), "the plain greedy output repeats a token, which this test needs"
    penalised = await _token_ids(handle, {"temperature": 0, **penalty})
    assert len(set(penalised)) == len(penalised)


async def test_max_completion_tokens_truncate_prompt_tokens_and_add_special_tokens_shape_usage(
    handle, tiny_engine
) -> None:
    chat = await handle(
        {"messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 2, "ignore_eos": True},
        url=CHAT,
    )
    assert chat.usage.completion_tokens == 2
    assert (await handle({"truncate_prompt_tokens": 3})).usage.prompt_tokens == 3
    with_bos = (await handle({})).usage.prompt_tokens
    assert with_bos == len(tiny_engine.tokenizer.encode(PROMPT))
    assert (await handle({"add_special_tokens": False})).usage.prompt_tokens == with_bos - 1


async def test_generation_config_defaults_apply_where_the_job_sets_nothing(
    handle, tiny_checkpoint, tmp_path
) -> None:
    greedy = await _token_ids(handle, {"temperature": 0, "max_tokens": 4})
    sampled = await _token_ids(handle, {"seed": 1, "max_tokens": 4})
    assert sampled != greedy and len(await _token_ids(handle, {"seed": 1, "max_tokens": None})) == 8
    # the same checkpoint, with generation_config.json defaults
    for item in tiny_checkpoint.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 4}))
    with_defaults = LLMEngine(EngineConfig(dtype="float32", model=str(tmp_path), max_model_len=256))
    engine = AsyncLLMEngine(with_defaults)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        with_defaults,
    )
    body = {
        "prompt": PROMPT,
        "seed": 1,
        "ignore_eos": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    try:
        outcome = await handler.handle(
            json.dumps({"custom_id": "j", "url": COMPLETIONS, "body": body}).encode(), [], 0, "jobs/0/1"
        )
    finally:
        await engine.stop()
    tokens = outcome.result.response.body.choices[0].logprobs.tokens
    assert [int(token.removeprefix("token_id:")) for token in tokens] == greedy  # greedy, 4 tokens


async def test_message_fields_text_parts_documents_and_template_kwargs_reach_the_chat_template(
    handle, tiny_engine
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}],
            "name": "ann",
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "cold", "tool_call_id": "call_1"},
    ]
    body = {
        "messages": messages,
        "chat_template": SHOW_ALL,
        "documents": [{"title": "river", "text": "cold"}],
        "chat_template_kwargs": {"flavour": "salty"},
        "max_tokens": 1,
    }
    result = await handle(body, url=CHAT)
    rendered = "[user|ann||]Hi\nyou[assistant|||weather][tool||call_1|]cold<river>salty"  # null content: ""
    tokenizer = tiny_engine.tokenizer
    assert result.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


async def test_logprob_bytes_are_the_tokens_own_bytes_for_half_a_character(handle, tiny_engine) -> None:
    tokenizer = tiny_engine.tokenizer
    half = tokenizer.encode("\u20ac", add_special_tokens=False)[0]  # the euro sign's first token
    body = {
        "messages": [{"role": "user", "content": "Price?"}],
        "logit_bias": {str(half): 100},
        "logprobs": True,
        "max_tokens": 1,
    }
    content = (await handle(body, url=CHAT)).choices[0].logprobs.content[0]
    assert content.token == "\ufffd"
    assert content.bytes == token_bytes(tokenizer, half) != list("\ufffd".encode())
