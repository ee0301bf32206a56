"""Job and result lines: OpenAI Batch format in, OpenAI Batch format out, JSON or MessagePack."""

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    BatchError,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.codec import (
    JSON,
    MSGPACK,
    JobDecodeError,
    decode_job,
    decode_job_envelope,
    decode_result,
    encode_job,
    encode_result,
    normalize_content_type,
    peek_custom_id,
)
from schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from schemas.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    CompletionChoice,
    ErrorBody,
    ErrorDetail,
    SluiceExtension,
    TextCompletion,
    Usage,
)

CONTENT_TYPES = [JSON, MSGPACK]


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _chat_job(**body) -> dict:
    return {
        "custom_id": "job-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
    }


def _completion_job(**body) -> dict:
    return {"custom_id": "job-2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", **body}}


# --- decoding jobs ------------------------------------------------------------------------


def test_chat_line_decodes_to_chat_completion_request() -> None:
    job = decode_job(_line(_chat_job(max_tokens=7, temperature=0.5, stop=["\n"], seed=3)))
    assert job.custom_id == "job-1"
    assert job.url == CHAT_URL
    assert isinstance(job.body, ChatCompletionRequest)
    assert job.body.messages == [ChatMessage(role="user", content="hi")]
    body = job.body
    assert (body.max_tokens, body.temperature, body.stop_strings, body.seed) == (7, 0.5, ["\n"], 3)


def test_completions_line_decodes_to_completion_request() -> None:
    job = decode_job(_line(_completion_job(prompt=[1, 2, 3], top_k=5, echo=True)))
    assert job.url == COMPLETIONS_URL
    assert isinstance(job.body, CompletionRequest)
    assert (job.body.prompt, job.body.top_k, job.body.echo) == ([1, 2, 3], 5, True)


def test_unknown_fields_are_ignored_at_every_level() -> None:
    obj = _chat_job(future_knob={"a": 1})
    obj["future_envelope_field"] = [1, 2]
    obj["body"]["messages"][0]["annotations"] = "x"
    obj["body"]["response_format"] = {"type": "text", "extra": True}
    job = decode_job(_line(obj))
    assert job.body.messages[0].text == "hi"
    assert job.body.response_format.type == "text"


def test_old_minimal_payload_decodes_with_defaults() -> None:
    old = b'{"custom_id": "old", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}}'
    job = decode_job(old)
    assert job.method == "POST"
    body = job.body
    assert (body.model, body.n, body.max_tokens, body.temperature, body.stop) == ("", 1, None, None, None)
    assert (body.output_limit, body.num_top_logprobs, body.ignore_eos) == (None, None, False)


def test_message_content_text_parts_join_with_newlines_as_vllm_does() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    job = decode_job(_line(_chat_job(messages=[{"role": "user", "content": parts}])))
    assert job.body.messages[0].text == "a\nb"


MSGPACK_NAMES = [
    "application/msgpack",
    "application/msgpack; charset=x",
    "application/x-msgpack",
    " Application/MsgPack",
]


@pytest.mark.parametrize("value", MSGPACK_NAMES)
def test_msgpack_content_types_normalize_to_msgpack(value: str) -> None:
    assert normalize_content_type(value) == MSGPACK


@pytest.mark.parametrize("value", [None, "", "application/json", "text/plain"])
def test_other_content_types_normalize_to_json(value: str | None) -> None:
    assert normalize_content_type(value) == JSON


@pytest.mark.parametrize("content_type", [JSON, *MSGPACK_NAMES])
def test_job_round_trips_through_encode_and_decode(content_type: str) -> None:
    chat = decode_job(_line(_chat_job(max_completion_tokens=9, stop="END", stop_token_ids=[4], top_p=0.9)))
    completion = decode_job(_line(_completion_job(prompt=[5, 6], logprobs=None, presence_penalty=-1.5)))
    responses = decode_job(
        json.dumps(
            {
                "custom_id": "r",
                "url": "/v1/responses",
                "body": {
                    "input": [
                        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                        {"type": "function_call_output", "call_id": "c", "output": "ok"},
                    ],
                    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                    "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
                    "max_output_tokens": 9,
                },
            }
        ).encode()
    )
    for job in (chat, completion, responses):
        assert decode_job(encode_job(job, content_type), content_type) == job


def test_msgpack_job_read_as_json_is_invalid_encoding() -> None:
    data = encode_job(decode_job(_line(_chat_job())), MSGPACK)
    assert msgspec.msgpack.decode(data)["custom_id"] == "job-1"
    with pytest.raises(JobDecodeError) as info:
        decode_job(data, JSON)
    assert info.value.code == "invalid_encoding"


# --- bad jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code", "names"),
    [
        (b'{"custom_id": "a", "url": "/v1/chat/compl', "invalid_encoding", "JSON"),
        (b'[{"custom_id": "a"}]', "invalid_request", "object"),
        (b'{"custom_id": "a", "url": "/v1/chat/completions"}', "invalid_request", "`body`"),
        (b'{"custom_id": "a", "url": "/v1/unknown", "body": {}}', "invalid_request", "$.url"),
        (
            b'{"custom_id": "a", "url": "/v1/moderations", "body": {}}',
            "unsupported_endpoint",
            "/v1/moderations",
        ),
        (_line(_chat_job(messages=[])), "invalid_request", "$.body.messages"),
        (_line(_chat_job(temperature=9)), "invalid_request", "$.body.temperature"),
        (_line(_completion_job(n=0)), "invalid_request", "$.body.n"),
        (_line(_completion_job(max_tokens=0)), "invalid_request", "$.body.max_tokens"),
    ],
    ids=[
        "truncated",
        "array",
        "no-body",
        "unknown-url",
        "unserved-url",
        "empty-messages",
        "temp-9",
        "n-0",
        "max-tokens-0",
    ],
)
def test_bad_job_raises_job_decode_error_with_stable_code_naming_the_field(
    data: bytes, code: str, names: str
) -> None:
    with pytest.raises(JobDecodeError) as info:
        decode_job(data)
    assert info.value.code == code
    assert names in info.value.message
    assert str(info.value).startswith(f"{code}: ")


def test_garbage_msgpack_is_invalid_encoding() -> None:
    with pytest.raises(JobDecodeError) as info:
        decode_job(b"\xc1\xc1\xc1", MSGPACK)
    assert info.value.code == "invalid_encoding"
    assert "MessagePack" in info.value.message


def test_body_error_path_is_prefixed_even_when_the_bad_value_contains_backtick_dollar() -> None:
    # The decoder rewrites `$ to `$.body in the message; the echoed bad value must not take that edit.
    with pytest.raises(JobDecodeError) as info:
        decode_job(_line(_chat_job(messages=[{"role": "`$x", "content": "hi"}])))
    assert "'`$x'" in info.value.message
    assert "`$.body.messages[0].role`" in info.value.message


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_an_envelope_keeps_the_body_bytes_and_round_trips_unchanged(content_type: str) -> None:
    job = _completion_job(weird=[1.5], max_tokens=0)  # a body the service will refuse: not checked here
    data = _line(job) if content_type == JSON else msgspec.msgpack.encode(job)
    envelope = decode_job_envelope(data, content_type)
    assert (envelope.custom_id, envelope.method, envelope.url) == ("job-2", "POST", COMPLETIONS_URL)
    decode = json.loads if content_type == JSON else msgspec.msgpack.decode
    assert decode(bytes(envelope.body)) == job["body"]
    again = decode_job_envelope(encode_job(envelope, content_type), content_type)
    assert bytes(again.body) == bytes(envelope.body)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"custom_id": "a", "url": ', "invalid_encoding"),
        (b'{"custom_id": "a", "url": "/v1/x", "body": 1}', "invalid_request"),
    ],
)
def test_a_bad_envelope_raises_job_decode_error_like_a_bad_job(data: bytes, code: str) -> None:
    with pytest.raises(JobDecodeError) as info:
        decode_job_envelope(data)
    assert info.value.code == code


def test_peek_custom_id_reads_the_id_of_an_otherwise_broken_job() -> None:
    assert peek_custom_id(b'{"custom_id": "keep-me", "url": "/v1/nope", "body": 3}') == "keep-me"
    assert peek_custom_id(msgspec.msgpack.encode({"custom_id": "mp", "body": None}), MSGPACK) == "mp"


@pytest.mark.parametrize("data", [b"garbage", b'{"custom_id": "a"', b"[1, 2]", b'{"custom_id": 5}', b""])
def test_peek_custom_id_is_none_for_garbage(data: bytes) -> None:
    assert peek_custom_id(data) is None


# --- results ------------------------------------------------------------------------------

USAGE = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
TIMINGS = SluiceExtension(schema_version=1, queue_ms=1.5, ttft_ms=2.25, total_ms=10.0, engine="tiny")


def _chat_result() -> BatchResponseLine:
    body = ChatCompletion(
        id="chatcmpl-1",
        created=1700000000,
        model="tiny",
        choices=[ChatChoice(message=AssistantMessage(content="hello"), finish_reason="stop")],
        usage=USAGE,
        sluice=TIMINGS,
    )
    return BatchResponseLine(
        id="batch_req_1",
        custom_id="c1",
        response=BatchResponse(status_code=200, request_id="req-1", body=body),
    )


def _text_result() -> BatchResponseLine:
    body = TextCompletion(
        id="cmpl-1",
        created=1700000000,
        model="tiny",
        choices=[CompletionChoice(text=" world", finish_reason="length")],
        usage=USAGE,
    )
    return BatchResponseLine(
        id="batch_req_2",
        custom_id="c2",
        response=BatchResponse(status_code=200, request_id="req-2", body=body),
    )


def _error_result() -> BatchResponseLine:
    body = ErrorBody(error=ErrorDetail(message="bad temperature", code="invalid_request"))
    return BatchResponseLine(
        id="batch_req_3",
        custom_id="c3",
        response=BatchResponse(status_code=400, request_id="req-3", body=body),
    )


def _responses_result() -> BatchResponseLine:
    from schemas.responses_api import (
        FunctionCallItem,
        InputTokensDetails,
        OutputMessage,
        OutputText,
        OutputTokensDetails,
        ReasoningItem,
        ReasoningText,
        ResponseBody,
        ResponseUsage,
    )

    body = ResponseBody(
        id="resp_1",
        created_at=1700000000,
        status="completed",
        model="tiny",
        output=[
            ReasoningItem(id="rs_1", content=[ReasoningText(text="hmm")]),
            OutputMessage(id="msg_1", status="completed", content=[OutputText(text="hello")]),
            FunctionCallItem(id="fc_1", call_id="call_1", name="f", arguments="{}"),
        ],
        usage=ResponseUsage(
            input_tokens=3,
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=3),
            output_tokens=2,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=1),
            total_tokens=5,
        ),
    )
    return BatchResponseLine(
        id="batch_req_4",
        custom_id="c4",
        response=BatchResponse(status_code=200, request_id="req-4", body=body),
    )


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize(
    "make",
    [_chat_result, _text_result, _error_result, _responses_result],
    ids=["chat", "text", "error", "responses"],
)
def test_result_round_trips_through_encode_and_decode(make, content_type: str) -> None:
    line = make()
    decoded = decode_result(encode_result(line, content_type), content_type)
    assert decoded == line
    assert type(decoded.response.body) is type(line.response.body)
    assert decoded.is_error == (make is _error_result)


def test_chat_result_json_has_openai_field_names() -> None:
    obj = json.loads(encode_result(_chat_result()))
    assert obj["error"] is None
    assert obj["custom_id"] == "c1"
    assert obj["response"]["status_code"] == 200
    body = obj["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["finish_reason"] == "stop"
    # vLLM's way: prompt_tokens_details is null where no cached-token count was given
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": None,
    }
    assert body["sluice"] == {
        "schema_version": 1,
        "queue_ms": 1.5,
        "ttft_ms": 2.25,
        "total_ms": 10.0,
        "engine": "tiny",
    }


def test_text_completion_result_json_has_openai_field_names() -> None:
    obj = json.loads(encode_result(_text_result()))
    assert obj["error"] is None
    body = obj["response"]["body"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " world"
    assert body["choices"][0]["finish_reason"] == "length"


def test_an_http_error_result_keeps_its_error_in_the_body_only() -> None:
    obj = json.loads(encode_result(_error_result()))
    assert obj["response"]["status_code"] == 400
    assert obj["response"]["body"]["error"]["code"] == "invalid_request"
    assert obj["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert obj["error"] is None  # one place, as OpenAI and vLLM write it
    assert decode_result(encode_result(_error_result())).failure == BatchError(
        code="invalid_request", message="bad temperature"
    )


# --- properties ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(custom_id=st.text(), prompt=st.text(), content_type=st.sampled_from(CONTENT_TYPES))
def test_any_custom_id_and_prompt_survive_a_job_round_trip(
    custom_id: str, prompt: str, content_type: str
) -> None:
    chat = BatchRequestLine(
        custom_id=custom_id,
        url=CHAT_URL,
        body=ChatCompletionRequest(messages=[ChatMessage(role="user", content=prompt)]),
    )
    completion = BatchRequestLine(
        custom_id=custom_id, url=COMPLETIONS_URL, body=CompletionRequest(prompt=prompt)
    )
    for job in (chat, completion):
        decoded = decode_job(encode_job(job, content_type), content_type)
        assert decoded == job
        assert peek_custom_id(encode_job(job, content_type), content_type) == custom_id
