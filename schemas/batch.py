"""OpenAI Batch API lines: a job is one input line, a result one output line.

Input:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings"
         | "/v1/responses", "body"}
Output: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

A failed job keeps OpenAI's shape: a request refused as an HTTP request would be has
`response.status_code` >= 400 with `{"error": {"message", "type", "param", "code"}}` as its body
and `error: null`; a failure that is not an HTTP error (bytes that are no job line at all, a
deadline that passed: OpenAI's `batch_expired`) has `response: null` and the top-level
`error: {"code", "message"}`.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Raw, Struct

from schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses import ChatCompletion, ErrorBody, TextCompletion
from schemas.responses_api import ResponseBody, ResponsesRequest

SCHEMA_VERSION = 1  # bumped only with a change readers must know about; fields are only added

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
CHAT_URL: Endpoint = "/v1/chat/completions"
COMPLETIONS_URL: Endpoint = "/v1/completions"
EMBEDDINGS_URL: Endpoint = "/v1/embeddings"
RESPONSES_URL: Endpoint = "/v1/responses"


class BatchRequestLine(Struct, kw_only=True):
    """One job: a line of the OpenAI Batch input format."""

    custom_id: str
    method: Literal["POST"] = "POST"
    url: Endpoint
    # chosen by `url` in the decoder
    body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest | ResponsesRequest


class BatchRequestEnvelope(Struct, kw_only=True):
    """A job line whose body is left undecoded: what a client forwards as it is (the service checks it)."""

    custom_id: str
    method: Literal["POST"] = "POST"
    url: Endpoint
    body: Raw


class BatchError(Struct, kw_only=True):
    code: str
    message: str


class BatchResponse(Struct, kw_only=True):
    status_code: int
    request_id: str
    body: ChatCompletion | TextCompletion | EmbeddingResponse | ResponseBody | ErrorBody


class BatchResponseLine(Struct, kw_only=True):
    """One result: a line of the OpenAI Batch output format."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None = None

    @property
    def is_error(self) -> bool:
        return self.failure is not None

    @property
    def failure(self) -> BatchError | None:
        """Why the job failed, from either place a result line keeps it; None for a success."""
        if self.error is not None:
            return self.error
        response = self.response
        if response is not None and response.status_code >= 400 and isinstance(response.body, ErrorBody):
            detail = response.body.error
            return BatchError(code=detail.code or detail.type, message=detail.message)
        return None
