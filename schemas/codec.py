"""Bytes <-> Batch lines. One typed decoder and encoder per content type, built once.

JSON is the default; MessagePack when the producer says `application/msgpack`. A result is
encoded in its job's content type.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from schemas.batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    RESPONSES_URL,
    BatchError,
    BatchRequestEnvelope,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from schemas.fields import unknown_body_fields
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses import ChatCompletion, ErrorBody, TextCompletion
from schemas.responses_api import ResponseBody, ResponsesRequest

JSON = "application/json"
MSGPACK = "application/msgpack"
ContentType = Literal["application/json", "application/msgpack"]


class JobDecodeError(ValueError):
    """A job that cannot become a request. `code` is stable (for dashboards); `message` says why;
    `param` names the body field at fault, where there is one (OpenAI's error `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param


def normalize_content_type(value: str | None) -> ContentType:
    """`application/msgpack` (or `application/x-msgpack`, any parameters) else JSON."""
    if value and value.split(";")[0].strip().lower() in (MSGPACK, "application/x-msgpack"):
        return MSGPACK
    return JSON


def decode_job(
    data: bytes, content_type: str | None = None, unknown_fields: Literal["ignore", "reject"] = "ignore"
) -> BatchRequestLine:
    """Decode one job, choosing the body type by `url`. Raises JobDecodeError with the reason.

    unknown_fields="reject": a body field (at any depth) that no request schema declares is
    an error (`unsupported_parameter`, its path as `param`), as OpenAI answers one."""
    codec = _CODECS[normalize_content_type(content_type)]
    envelope = decode_job_envelope(data, content_type)
    body_type = _BODY_TYPES[envelope.url]
    body_decoder = codec.bodies[envelope.url]
    try:
        body = _decode(body_decoder, envelope.body, codec.name)
    except JobDecodeError as e:
        message = _under_body(e.message)
        raise JobDecodeError(e.code, message, _param_of(message)) from None
    if unknown_fields == "reject" and (
        unknown := unknown_body_fields(codec.raw.decode(envelope.body), body_type)
    ):
        raise JobDecodeError(
            "unsupported_parameter",
            f"unknown field `{unknown[0]}` (this service refuses fields it does not know rather than ignore them)",
            unknown[0],
        )
    return BatchRequestLine(custom_id=envelope.custom_id, method=envelope.method, url=envelope.url, body=body)


def decode_job_envelope(data: bytes, content_type: str | None = None) -> BatchRequestEnvelope:
    """Decode one job's envelope, its body left as raw bytes. Raises JobDecodeError with the reason."""
    codec = _CODECS[normalize_content_type(content_type)]
    try:
        return _decode(codec.envelope, data, codec.name)
    except JobDecodeError as e:
        if e.code == "invalid_request" and (url := _peek_url(codec, data)) in UNSERVED_URLS:
            raise JobDecodeError(
                "unsupported_endpoint",
                f"{url} is not served here; only {CHAT_URL}, {COMPLETIONS_URL}, {EMBEDDINGS_URL} "
                f"and {RESPONSES_URL}",
                "url",
            ) from None
        raise JobDecodeError(e.code, e.message, _envelope_param(e.message)) from None


# endpoints of OpenAI's batch API that Sluice does not serve: refused by name, not as a bad url
UNSERVED_URLS = ("/v1/moderations",)
_BODY_TYPES = {
    CHAT_URL: ChatCompletionRequest,
    COMPLETIONS_URL: CompletionRequest,
    EMBEDDINGS_URL: EmbeddingRequest,
    RESPONSES_URL: ResponsesRequest,
}


def _peek_url(codec: _Codec, data: bytes) -> str | None:
    try:
        return _decode(codec.peek_url, data, codec.name).url
    except JobDecodeError:
        return None


def peek_custom_id(data: bytes, content_type: str | None = None) -> str | None:
    """The job's custom_id if one can be read at all: lets a broken job's error keep its id."""
    codec = _CODECS[normalize_content_type(content_type)]
    try:
        return _decode(codec.peek, data, codec.name).custom_id
    except JobDecodeError:
        return None


def encode_result(line: BatchResponseLine, content_type: str | None = None) -> bytes:
    return _CODECS[normalize_content_type(content_type)].encoder.encode(line)


def encode_job(line: BatchRequestLine | BatchRequestEnvelope, content_type: str | None = None) -> bytes:
    return _CODECS[normalize_content_type(content_type)].encoder.encode(line)


def decode_result(data: bytes, content_type: str | None = None) -> BatchResponseLine:
    """Read a result back (clients, tests). A body is an error body when the status says so.

    Raises msgspec.DecodeError (or its subclass ValidationError) for bytes that are not a result line."""
    codec = _CODECS[normalize_content_type(content_type)]
    raw = codec.result.decode(data)
    response = None
    if raw.response is not None:
        body_decoder = codec.error_body if raw.response.status_code >= 400 else codec.completion_body
        response = BatchResponse(
            status_code=raw.response.status_code,
            request_id=raw.response.request_id,
            body=body_decoder.decode(raw.response.body),
        )
    return BatchResponseLine(id=raw.id, custom_id=raw.custom_id, response=response, error=raw.error)


def _envelope_param(message: str) -> str | None:
    """The line's field a msgspec message names: `... - at `$.method`` or `... required field `url``."""
    _, sep, path = message.rpartition(" - at `$.")
    if sep:
        return path.rstrip("`").split(".")[0].split("[")[0] or None
    _, sep, name = message.rpartition("required field `")
    return name.rstrip("`") or None if sep else None


def _param_of(message: str) -> str | None:
    """`$.body.messages[0].role` in a msgspec message -> `messages[0].role`; a mapping's value
    (`$.body.logit_bias[...]`) -> the mapping's field, `logit_bias`."""
    _, sep, path = message.rpartition(" - at `$.body")
    return path.rstrip("`").lstrip(".").replace("[...]", "") or None if sep else None


def _decode(decoder, data: bytes, codec_name: str):
    """`decoder.decode(data)`; whatever the bytes, a failure is a JobDecodeError that says why."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:
        raise JobDecodeError("invalid_request", str(e)) from None
    except msgspec.DecodeError as e:
        raise JobDecodeError("invalid_encoding", f"not a valid {codec_name} job line: {e}") from None
    except UnicodeDecodeError as e:
        raise JobDecodeError("invalid_encoding", f"a string of the job is not valid UTF-8: {e}") from None
    except RecursionError:
        raise JobDecodeError("invalid_request", "the job is nested too deeply to decode") from None
    except (ValueError, OverflowError) as e:  # anything else msgspec may refuse
        raise JobDecodeError("invalid_encoding", f"not a valid {codec_name} job line: {e}") from None


def _under_body(message: str) -> str:
    """msgspec reports paths from the body's root; the job's reader needs `$.body...`."""
    head, sep, path = message.rpartition(" - at `$")
    return f"{head}{sep}.body{path}" if sep else message


class _RawResponse(Struct, kw_only=True):
    status_code: int
    request_id: str
    body: msgspec.Raw


class _RawResponseLine(Struct, kw_only=True):
    id: str
    custom_id: str
    response: _RawResponse | None
    error: BatchError | None = None


class _CustomIdOnly(Struct):
    custom_id: str | None = None


class _UrlOnly(Struct):
    url: str | None = None


class _Codec:
    def __init__(self, name: str, module) -> None:
        self.name = name
        self.envelope = module.Decoder(BatchRequestEnvelope)
        self.bodies = {url: module.Decoder(body_type) for url, body_type in _BODY_TYPES.items()}
        self.peek = module.Decoder(_CustomIdOnly)
        self.peek_url = module.Decoder(_UrlOnly)
        self.raw = module.Decoder()  # a body as plain objects, for the names of its fields
        self.result = module.Decoder(_RawResponseLine)
        self.completion_body = module.Decoder(
            ChatCompletion | TextCompletion | EmbeddingResponse | ResponseBody
        )
        self.error_body = module.Decoder(ErrorBody)
        self.encoder = module.Encoder()


_CODECS: dict[str, _Codec] = {
    JSON: _Codec("JSON", msgspec.json),
    MSGPACK: _Codec("MessagePack", msgspec.msgpack),
}
