"""JobHandler: whatever the bytes and headers, a job ends as an error result with a clear code
(never an exception, never an engine_error 500); an engine double fails the test if reached."""

from __future__ import annotations

import json

import msgspec
import pytest

from service.jobs import JobHandler


class _Unreachable:
    """Stands in for DynamicBatcher: a job that reaches it is a test failure."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    async def generate(self, *args, **kwargs):
        pytest.fail("a hostile job reached the engine")


@pytest.fixture
def handler(tiny_engine) -> JobHandler:
    return JobHandler(_Unreachable(tiny_engine.tokenizer), "tiny", default_max_tokens=8)


def _job(custom_id="j1", **body) -> bytes:
    body = {"prompt": "hello", **body}
    return json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}).encode()


async def _error(handler, value: bytes, headers=()) -> tuple[str, str, str]:
    outcome = await handler.handle(value, list(headers), 0, "jobs/0/7")
    assert outcome.is_error
    return outcome.result.custom_id, outcome.result.error.code, outcome.result.error.message


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
