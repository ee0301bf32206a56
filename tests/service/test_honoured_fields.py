"""Honoured request fields do what OpenAI and vLLM say: each one through the JobHandler on the tiny engine.

Greedy (temperature 0) jobs, so that each field's effect is compared with the same job without it.
"""

from __future__ import annotations

import json
import time

import pytest

from engine.async_engine import AsyncLLMEngine
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.jobs import JobHandler

PROMPT = "The river is cold today, and many people"
LONG_PROMPT = "The river is cold today, and many people went home because the river was cold. " * 3
LABELS = ["positive", "negative", "neutral"]


@pytest.fixture
async def handle(tiny_engine):
    engine = AsyncLLMEngine(tiny_engine)
    engine.start()
    handler = JobHandler(
        ServiceConfig(model_name="tiny", default_max_tokens=8),
        DynamicBatcher(engine, max_batch_size=8, max_wait_ms=1),
        tiny_engine,
    )

    async def run(body: dict, url: str = "/v1/completions"):
        base = {"prompt": PROMPT} if url == "/v1/completions" else {}
        job = {"custom_id": "j", "url": url, "body": {**base, "temperature": 0, "max_tokens": 6, **body}}
        outcome = await handler.handle(json.dumps(job).encode(), [], int(time.time() * 1000), "jobs/0/1")
        assert outcome.result.response.status_code == 200, outcome.result.failure
        return outcome.result.response.body

    yield run
    await engine.stop()


def _token_ids(tokenizer, body) -> list[int]:
    return tokenizer.encode(body.choices[0].text, add_special_tokens=False)


async def test_a_positive_logit_bias_forces_its_token(handle, tiny_engine) -> None:
    token = tiny_engine.tokenizer.encode(" river", add_special_tokens=False)[0]
    body = await handle({"logit_bias": {str(token): 100}, "ignore_eos": True})
    assert body.choices[0].text == tiny_engine.tokenizer.decode([token] * 6)


async def test_a_negative_logit_bias_bans_the_greedy_token(handle, tiny_engine) -> None:
    plain = await handle({"max_tokens": 1, "logprobs": 0})
    first = plain.choices[0].logprobs.tokens[0]
    token = tiny_engine.tokenizer.convert_tokens_to_ids(tiny_engine.tokenizer.tokenize(first))[0]
    banned = await handle({"max_tokens": 1, "logit_bias": {str(token): -100}, "logprobs": 0})
    assert banned.choices[0].logprobs.tokens[0] != first


async def test_min_tokens_holds_a_stop_token_back_until_it_is_reached(handle) -> None:
    plain = await handle({"max_tokens": 1, "return_tokens_as_token_ids": True, "logprobs": 0})
    first = int(plain.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    stopped = await handle({"stop_token_ids": [first]})
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 1)
    held = await handle({"stop_token_ids": [first], "min_tokens": 4, "max_tokens": 8})
    assert held.usage.completion_tokens >= 4


async def test_include_stop_str_in_output_keeps_the_stop_string_and_stop_reason_names_it(handle) -> None:
    text = (await handle({"max_tokens": 8})).choices[0].text
    stop = text[3:6]
    cut = await handle({"max_tokens": 8, "stop": [stop]})
    kept = await handle({"max_tokens": 8, "stop": [stop], "include_stop_str_in_output": True})
    assert cut.choices[0].text == text[: text.find(stop)]
    assert kept.choices[0].text == text[: text.find(stop) + len(stop)]
    assert (cut.choices[0].finish_reason, cut.choices[0].stop_reason) == ("stop", stop)


async def test_skip_special_tokens_false_keeps_an_included_eos_in_the_text(handle, tiny_engine) -> None:
    eos = tiny_engine.tokenizer.eos_token_id
    forced = {"logit_bias": {str(eos): 100}}
    assert (await handle(forced)).choices[0].text == ""
    body = await handle({**forced, "skip_special_tokens": False, "include_stop_str_in_output": True})
    assert body.choices[0].text == tiny_engine.tokenizer.eos_token
    assert body.choices[0].stop_reason is None  # EOS is no stop token of the job's (vLLM: null)


async def test_cached_tokens_count_the_prompt_the_prefix_cache_gave(handle) -> None:
    first = await handle({"prompt": LONG_PROMPT + "first"})
    again = await handle({"prompt": LONG_PROMPT + "again"})
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


async def test_echo_puts_the_prompt_before_the_completion(handle) -> None:
    plain = await handle({})
    echoed = await handle({"echo": True})
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


async def test_chat_echo_and_continue_final_message_continue_an_assistant_prefill(handle) -> None:
    messages = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Yes, the river"}]
    body = {
        "messages": messages,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "echo": True,
    }
    result = await handle(body, url="/v1/chat/completions")
    assert result.choices[0].message.content.startswith("Yes, the river")


async def test_a_greedy_choice_job_labels_the_choice_its_probabilities_name(handle) -> None:
    for review in ("the soup was cold", "great service", "it was fine", "never again"):
        body = await handle(
            {"messages": [{"role": "user", "content": f"Sentiment of: {review}"}], "guided_choice": LABELS},
            url="/v1/chat/completions",
        )
        probabilities = body.sluice.choice_probabilities
        assert body.choices[0].message.content == max(probabilities, key=probabilities.get)


async def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(handle, tiny_engine) -> None:
    body = await handle({"logprobs": 2, "return_tokens_as_token_ids": True})
    tokens = body.choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") for t in tokens)
    assert tiny_engine.tokenizer.decode([int(t[9:]) for t in tokens]) == body.choices[0].text


@pytest.mark.parametrize("alternatives", [0, 1, 3])
async def test_completion_top_logprobs_always_hold_the_sampled_token(handle, alternatives) -> None:
    """OpenAI and vLLM: each position's top_logprobs has the sampled token, and up to `logprobs`
    others (`logprobs: 0` gives the sampled token alone, not an empty object)."""
    body = await handle({"logprobs": alternatives, "temperature": 1.0, "seed": 3, "ignore_eos": True})
    lp = body.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob
        assert 1 <= len(top) <= alternatives + 1
        assert next(iter(top)) == token  # the sampled token first
