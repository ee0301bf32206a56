"""JobHandler: whatever the bytes and headers, a job ends as an error result with a clear code
(never an exception, never an engine_error 500); an engine double fails the test if reached."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest

from engine import RequestRejected
from service.backpressure import Backpressure
from service.config import ServiceConfig
from service.jobs import JobHandler
from service.limits import JobLimits


class _Unreachable:
    """Stands in for DynamicBatcher: a job that reaches it is a test failure."""

    def __init__(self, tokenizer, generation_defaults=None) -> None:
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults or {}

    async def generate(self, *args, **kwargs):
        pytest.fail("a hostile job reached the engine")


@pytest.fixture
def handler(tiny_engine) -> JobHandler:
    return JobHandler(_config(), _Unreachable(tiny_engine.tokenizer), tiny_engine)


def _config(**limits) -> ServiceConfig:
    return ServiceConfig(model_name="tiny", default_max_tokens=8, limits=JobLimits(**limits))


def _job(custom_id="j1", **body) -> bytes:
    body = {"prompt": "hello", **body}
    return json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}).encode()


async def _error(handler, value: bytes, headers=()) -> tuple[str, str, str]:
    outcome = await handler.handle(value, list(headers), 0, "jobs/0/7")
    assert outcome.is_error
    return outcome.result.custom_id, outcome.result.failure.code, outcome.result.failure.message


async def test_a_header_key_that_is_not_utf8_is_invalid_encoding(handler):
    bad_key = b"\xffkey".decode("utf-8", "surrogateescape")  # as service/lenient_records.py reads it
    custom_id, code, message = await _error(handler, _job(), [(bad_key, b"v")])
    assert (custom_id, code) == ("j1", "invalid_encoding")
    assert "\\xffkey" in message


async def test_json_nested_100000_deep_is_invalid_request(handler):
    deep = b'{"custom_id": "deep", "url": "/v1/completions", "body": {"prompt": "x", "extra": '
    deep += b"[" * 100_000 + b"]" * 100_000 + b"}}"
    assert await _error(handler, deep) == (
        "jobs/0/7",
        "invalid_request",
        "the job is nested too deeply to decode",
    )


@pytest.mark.parametrize("content_type", [b"application/json", b"application/msgpack"])
async def test_a_custom_id_that_is_not_utf8_is_invalid_encoding(handler, content_type):
    doc = {"custom_id": "CUSTOM", "url": "/v1/completions", "body": {"prompt": "x"}}
    encode = msgspec.msgpack.encode if b"msgpack" in content_type else msgspec.json.encode
    value = encode(doc).replace(b"CUSTOM", b"\xff\xfe\xfd\xfc\xfb\xfa")
    custom_id, code, message = await _error(handler, value, [("content-type", content_type)])
    assert (custom_id, code) == ("jobs/0/7", "invalid_encoding")
    assert "UTF-8" in message or "invalid" in message


@pytest.mark.parametrize("raw", [b"9" * 400, b"9" * 5000, b"-5", b"soon", b"1e30"])
async def test_an_unreadable_deadline_header_is_invalid_request(handler, raw):
    custom_id, code, message = await _error(handler, _job(), [("sluice-deadline-ms", raw)])
    assert (custom_id, code) == ("j1", "invalid_request")
    assert message.startswith("the sluice-deadline-ms header must be Unix time in milliseconds")
    assert len(message) < 200


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00\xff", b"[]", b"null", b'{"custom_id": 5}', b"\xc1", b'{"custom_id": "a"' + b" " * 10],
)
async def test_bytes_that_are_no_job_are_an_error_result(handler, value):
    _, code, _ = await _error(handler, value)
    assert code in ("invalid_encoding", "invalid_request")


# Limits: refused by name before any work (the engine double is never reached)


def _limited(tiny_engine, generation_defaults=None, **limits) -> JobHandler:
    return JobHandler(
        _config(**limits), _Unreachable(tiny_engine.tokenizer, generation_defaults), tiny_engine
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"guided_choice": [f"c{i}" for i in range(257)]}, "guided_choice"),
        ({"structured_outputs": {"choice": [f"c{i}" for i in range(50_000)]}}, "structured_outputs.choice"),
        ({"logprobs": 20, "max_tokens": 100_000}, "logprobs"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ],
)
async def test_a_job_past_a_limit_is_refused_by_name(tiny_engine, body, param):
    handler = _limited(tiny_engine, max_logprob_tokens=1000)
    outcome = await handler.handle(_job(**body), [], 0, "jobs/0/7")
    assert outcome.result.failure.code == "limit_exceeded"
    assert outcome.result.response.body.error.param == param
    assert outcome.result.failure.message.startswith(f"{param}: this service takes at most")


async def test_the_logprob_limit_counts_the_max_tokens_that_runs_the_checkpoints_default(tiny_engine):
    # a job without max_tokens runs the checkpoint's max_new_tokens (200 here), not default_max_tokens (8)
    handler = _limited(tiny_engine, {"max_tokens": 200}, max_logprob_tokens=1000)
    outcome = await handler.handle(_job(logprobs=5), [], 0, "jobs/0/7")
    assert outcome.result.failure.code == "limit_exceeded"
    assert outcome.result.failure.message.endswith("got 1200")  # 200 x (5 + 1)


@pytest.mark.parametrize("samples", [{"n": 4}, {"n": 1, "best_of": 4}])
async def test_the_logprob_limit_counts_every_sample(tiny_engine, samples):
    # 100 x (5 + 1) = 600 for one sample; each of the 4 samples draws its own logprobs
    handler = _limited(tiny_engine, max_logprob_tokens=1000)
    outcome = await handler.handle(_job(logprobs=5, max_tokens=100, **samples), [], 0, "jobs/0/7")
    assert outcome.result.failure.code == "limit_exceeded"
    assert outcome.result.failure.message.endswith("got 2400")


async def test_a_job_larger_than_max_job_bytes_is_job_too_large(tiny_engine):
    handler = _limited(tiny_engine, max_job_bytes=1000)
    outcome = await handler.handle(_job(prompt="x" * 2000), [], 0, "jobs/0/7")
    assert (outcome.result.failure.code, outcome.result.response.status_code) == ("job_too_large", 413)
    assert outcome.result.custom_id == "j1"


@pytest.mark.parametrize("prompt", [list(range(5, 105)), "hello " * 100])
async def test_a_prompt_over_max_prompt_tokens_is_invalid_prompt(tiny_engine, prompt):
    handler = _limited(tiny_engine, max_prompt_tokens=50)
    outcome = await handler.handle(_job(prompt=prompt), [], 0, "jobs/0/7")
    assert outcome.result.failure.code == "invalid_prompt"
    assert "this service takes at most 50" in outcome.result.failure.message


class _Capture:
    """Stands in for DynamicBatcher: notes what reached it (and the tokens in flight), then refuses."""

    def __init__(self, tokenizer, backpressure) -> None:
        self.tokenizer = tokenizer
        self.generation_defaults = {}
        self.backpressure = backpressure
        self.prompts: list[list[int]] = []
        self.tokens_in_flight: list[int] = []
        self.jobs_in_flight: list[int] = []

    async def generate(self, request_id, prompt, params, priority=0, tag=None):
        self.prompts.append(prompt)
        self.tokens_in_flight.append(self.backpressure.tokens)
        self.jobs_in_flight.append(self.backpressure.jobs)
        raise RequestRejected("captured")


def _capturing(tiny_engine, **limits) -> tuple[JobHandler, _Capture]:
    backpressure = Backpressure(max_jobs=10, max_tokens=10**9)
    capture = _Capture(tiny_engine.tokenizer, backpressure)
    return JobHandler(_config(**limits), capture, tiny_engine, backpressure), capture


async def test_tokens_in_flight_count_max_tokens_as_the_engine_clips_it(tiny_engine):
    handler, capture = _capturing(tiny_engine)
    await handler.handle(_job(prompt=[5, 6, 7], max_tokens=10**12), [], 0, "jobs/0/7")
    assert capture.tokens_in_flight == [tiny_engine.max_model_len]


async def test_each_embedding_input_counts_as_a_job_in_flight(tiny_engine):
    # one record of 2048 inputs is 2048 engine requests: backpressure counts each (the service
    # counts the record itself when it fetches it, so the handler adds the other inputs)
    handler, capture = _capturing(tiny_engine)
    job = {"custom_id": "e", "url": "/v1/embeddings", "body": {"model": "tiny", "input": ["a", "b", "c"]}}
    await handler.handle(json.dumps(job).encode(), [], 0, "jobs/0/7")
    assert capture.jobs_in_flight == [2, 2, 2]
    assert capture.backpressure.jobs == 0  # given back when the job ends


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
async def test_prompt_text_spelling_a_control_token_is_tokenised_as_text(tiny_engine, url):
    eos = tiny_engine.tokenizer.eos_token_id
    text = f"hi {tiny_engine.tokenizer.eos_token} there"
    body = {"prompt": text} if url == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    job = json.dumps({"custom_id": "s", "url": url, "body": body}).encode()
    handler, capture = _capturing(tiny_engine)
    trusted, trusted_capture = _capturing(tiny_engine, allow_special_tokens=True)
    await handler.handle(job, [], 0, "jobs/0/7")
    await trusted.handle(job, [], 0, "jobs/0/7")
    (as_text,), (as_control,) = capture.prompts, trusted_capture.prompts
    assert as_control.count(eos) == as_text.count(eos) + 1  # the template's own EOS stays a control token
    assert tiny_engine.tokenizer.decode(as_text) == tiny_engine.tokenizer.decode(as_control)


async def test_tokenising_a_long_prompt_leaves_the_event_loop_free(tiny_engine):
    handler, _ = _capturing(tiny_engine)
    job = _job(prompt="the quick brown fox " * 50_000)  # 1 MB of text: about a second of tokenising
    lags: list[float] = []

    async def heartbeat():
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - start - 0.01)

    beating = asyncio.create_task(heartbeat())
    started = time.monotonic()
    outcome = await handler.handle(job, [], 0, "jobs/0/7")
    beating.cancel()
    tokenising = time.monotonic() - started
    assert outcome.result.failure.message.startswith("the prompt has 500004 tokens")  # it did tokenise
    # Relative to this machine's own speed: the loop kept beating while the prompt was tokenised,
    # never stalled for a large part of it (a blocked loop would stall for all of it).
    assert lags and max(lags) < tokenising / 2
