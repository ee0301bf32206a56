"""The one place where the wire format meets the engine.

wire request -> (prompt token ids, SamplingParams); engine output -> wire result line. Every
request field is honoured here or refused by name (service/fields.py holds the table).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from engine import RequestOutput, SamplingParams
from schemas.batch import (
    SCHEMA_VERSION,
    BatchError,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.codec import JobDecodeError
from schemas.openai import ChatCompletionRequest
from schemas.responses import (
    ChatCompletion,
    CompletionTokensDetails,
    ErrorBody,
    ErrorDetail,
    PromptTokensDetails,
    SluiceExtension,
    TextCompletion,
    Usage,
)
from service.choices import result_choices
from service.fields import TranslationError, check_fields
from service.prompts import PromptError
from service.prompts import prompt_token_ids as prompt_token_ids_of
from service.reasoning import num_reasoning_tokens
from service.sampling import sampling_params


@dataclass(slots=True)
class EngineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM's convention)


def new_request_id() -> str:
    """A job's id, `req_` + 32 hex digits: its result's `response.request_id`, its engine
    request's id, its span's `sluice.request_id` and the id in the log lines about it, so that
    a result leads to the job's trace and logs. A new one per delivery: a job read again is a
    new request."""
    return f"req_{uuid.uuid4().hex}"


def check_model(job: BatchRequestLine, served_names: Collection[str]) -> None:
    """The job's `model` must be the served model's name or an alias; empty means the served model."""
    model = job.body.model
    if model and model not in served_names:
        names = ", ".join(sorted(served_names))
        raise TranslationError(
            "model_not_found",
            f"the model `{model}` does not exist here; this service serves {names}",
            404,
            "model",
        )


def to_engine_request(
    job: BatchRequestLine,
    tokenizer,
    default_max_tokens: int,
    generation_defaults: Mapping[str, float | int] | None = None,
    allow_special_tokens: bool = False,
    reasoning_parser: str = "none",
    rendered_chat: str | None = None,
) -> EngineRequest:
    """The job as the engine's prompt and SamplingParams. Refuses any field it cannot honour, by name.

    generation_defaults: the checkpoint's sampling defaults (generation_config.json, by
    SamplingParams field); a field the job sets wins, then these, then OpenAI's defaults.
    Prompt text is the user's text: a control token it spells (`</s>`, `<|eot_id|>`) is
    tokenised as text unless `allow_special_tokens` (trusted producers). A harmony chat job's
    output keeps its special tokens: they are the channel tags the reasoning parser splits on.
    `rendered_chat`: a chat job's own template's rendering of it (the service renders those in its
    template sandbox); None: rendered here."""
    body = job.body
    try:
        check_fields(body)
        prompt_token_ids = prompt_token_ids_of(body, tokenizer, allow_special_tokens, rendered_chat)
    except PromptError as e:
        raise TranslationError(e.code, e.message, param=e.param) from None
    params = sampling_params(body, default_max_tokens, generation_defaults, reasoning_parser)
    return EngineRequest(prompt_token_ids, params, body.priority)


def to_result_line(
    job: BatchRequestLine,
    output: RequestOutput,
    model_name: str,
    enqueued_time: float,
    tokenizer=None,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "none",
    request_id: str | None = None,
    system_fingerprint: str | None = None,
) -> BatchResponseLine:
    """A finished engine output as an OpenAI Batch output line, with Sluice's timings.

    `request_id`: the job's (new_request_id; a new one when None); `system_fingerprint`: the
    serving configuration's (service/fingerprint.py). An output the engine aborted is not an
    answer: it becomes a 500 error result."""
    if output.finish_reason == "abort":
        return to_error_line(
            job.custom_id, "engine_error", "the engine aborted the request", 500, request_id=request_id
        )
    body = job.body
    samples = output.samples or [output]
    # every returned sample's tokens (as vLLM counts them); the prompt once
    num_prompt, num_output = len(output.prompt_token_ids), sum(len(s.token_ids) for s in samples)
    usage = Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_output,
        total_tokens=num_prompt + num_output,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=output.num_cached_tokens),
    )
    if isinstance(body, ChatCompletionRequest) and reasoning_parser != "none" and tokenizer is not None:
        outputs = [(s.text, s.finish_reason == "length") for s in samples]
        num_reasoning = num_reasoning_tokens(outputs, reasoning_parser, tokenizer)
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=num_reasoning)
    # Both endpoints' bodies differ only in their id prefix and the shape of a choice.
    common = dict(
        created=int(time.time()),
        model=model_name,
        usage=usage,
        system_fingerprint=system_fingerprint,
        sluice=_extension(output, enqueued_time),
    )
    choices = result_choices(body, output, samples, tokenizer, tool_call_parser, reasoning_parser)
    if isinstance(body, ChatCompletionRequest):
        response_body = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", choices=choices, **common)
    else:
        response_body = TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", choices=choices, **common)
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=job.custom_id,
        response=BatchResponse(
            status_code=200, request_id=request_id or new_request_id(), body=response_body
        ),
    )


def to_error_line(
    custom_id: str,
    code: str,
    message: str,
    status_code: int = 400,
    param: str | None = None,
    request_id: str | None = None,
) -> BatchResponseLine:
    """A job refused as an HTTP request would be: OpenAI's error body under its status code.
    `request_id`: the job's, where it has one (a new one when None)."""
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=BatchResponse(
            status_code=status_code,
            request_id=request_id or new_request_id(),
            body=ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code)),
        ),
    )


def to_decode_error_line(
    custom_id: str, error: JobDecodeError, request_id: str | None = None
) -> BatchResponseLine:
    """The result of bytes that are no job: no request line at all (not JSON or MessagePack, not
    UTF-8) is a failure line; a line that decodes but is no valid job, the HTTP error it would get.
    The service and `sluice batch` both write it, so the same line gives the same result."""
    if error.code == "invalid_encoding":
        return to_failure_line(custom_id, error.code, error.message)
    return to_error_line(custom_id, error.code, error.message, param=error.param, request_id=request_id)


def to_failure_line(custom_id: str, code: str, message: str) -> BatchResponseLine:
    """A failure that is no HTTP error (bytes that are no job line, a deadline that passed, as
    OpenAI's `batch_expired`): no response, the top-level `error`."""
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=None,
        error=BatchError(code=code, message=message),
    )


def _extension(output: RequestOutput, enqueued_time: float) -> SluiceExtension:
    metrics = output.metrics
    finished = metrics.finished_time or time.time()
    ttft = (
        None if metrics.first_token_time is None else (metrics.first_token_time - metrics.arrival_time) * 1e3
    )
    return SluiceExtension(
        choice_probabilities=output.choice_probabilities,
        schema_version=SCHEMA_VERSION,
        queue_ms=round(max(0.0, metrics.arrival_time - enqueued_time) * 1e3, 3),
        ttft_ms=None if ttft is None else round(ttft, 3),
        total_ms=round(max(0.0, finished - enqueued_time) * 1e3, 3),
    )
