"""The one place where the wire format meets the engine.

wire request -> (prompt token ids, SamplingParams); engine output -> wire result line.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from engine import RequestOutput, SamplingParams, StructuredOutputs
from schemas.batch import (
    CHAT_URL,
    SCHEMA_VERSION,
    BatchError,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    SluiceExtension,
    TextCompletion,
    Usage,
)
from service.logprobs import chat_logprobs, completion_logprobs


class TranslationError(ValueError):
    """A decodable job this service cannot run as asked. `code` goes into the error result."""

    def __init__(self, code: str, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code


@dataclass(slots=True)
class EngineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM's convention)


def to_engine_request(job: BatchRequestLine, tokenizer, default_max_tokens: int) -> EngineRequest:
    body = job.body
    prompt_token_ids = _prompt_token_ids(body, tokenizer)
    structured_outputs = _structured_outputs(body)
    try:
        params = SamplingParams(
            max_tokens=body.output_limit or default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k in (None, 0) else body.top_k,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop_strings,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=body.num_top_logprobs,
            structured_outputs=structured_outputs,
        )
    except ValueError as e:
        raise TranslationError("invalid_request", str(e)) from None
    return EngineRequest(prompt_token_ids, params, body.priority)


def to_result_line(
    job: BatchRequestLine, output: RequestOutput, model_name: str, enqueued_time: float, tokenizer=None
) -> BatchResponseLine:
    """A finished engine output as an OpenAI Batch output line, with Sluice's timings."""
    usage = Usage(
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(output.token_ids),
        total_tokens=len(output.prompt_token_ids) + len(output.token_ids),
    )
    # Both endpoints' bodies differ only in their id prefix and the shape of a choice.
    common = dict(
        created=int(time.time()), model=model_name, usage=usage, sluice=_extension(output, enqueued_time)
    )
    has_logprobs = output.logprobs is not None
    if job.url == CHAT_URL:
        choice = ChatChoice(
            message=AssistantMessage(content=output.text),
            finish_reason=output.finish_reason,
            logprobs=chat_logprobs(output.logprobs, tokenizer) if has_logprobs else None,
        )
        body = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", choices=[choice], **common)
    else:
        choice = CompletionChoice(
            text=output.text,
            finish_reason=output.finish_reason,
            logprobs=completion_logprobs(output.logprobs, tokenizer) if has_logprobs else None,
        )
        body = TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", choices=[choice], **common)
    request_id = f"req-{uuid.uuid4().hex}"
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=job.custom_id,
        response=BatchResponse(status_code=200, request_id=request_id, body=body),
    )


def to_error_line(custom_id: str, code: str, message: str, status_code: int = 400) -> BatchResponseLine:
    """A failed job: OpenAI's error body under its status code, and the top-level error."""
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=BatchResponse(
            status_code=status_code,
            request_id=f"req-{uuid.uuid4().hex}",
            body=ErrorBody(error=ErrorDetail(message=message, type=error_type, code=code)),
        ),
        error=BatchError(code=code, message=message),
    )


def _prompt_token_ids(body: ChatCompletionRequest | CompletionRequest, tokenizer) -> list[int]:
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            return list(body.prompt)
        return tokenizer.encode(body.prompt)
    if not tokenizer.chat_template:
        raise TranslationError("unsupported_endpoint", "this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may reject a role order; its message says which
        raise TranslationError("invalid_request", f"the chat template rejected the messages: {e}") from None
    # The rendered template already holds the BOS token where the model wants one.
    return tokenizer.encode(rendered, add_special_tokens=False)


def _structured_outputs(body: ChatCompletionRequest | CompletionRequest) -> StructuredOutputs | None:
    """The one output constraint of vLLM's or OpenAI's fields; two at once is an error, not a guess."""
    given: list[tuple[str, dict]] = []  # (the field as the request spelled it, StructuredOutputs kwargs)
    if (so := body.structured_outputs) is not None:
        for name in ("grammar", "structural_tag"):
            if getattr(so, name) is not None:
                raise TranslationError(
                    "unsupported_parameter",
                    f"structured_outputs.{name} is not supported; use choice, regex or json",
                )
        given += [
            (f"structured_outputs.{name}", {name: getattr(so, name)}) for name in ("choice", "regex", "json")
        ]
        given.append(("structured_outputs.json_object", {"json_object": bool(so.json_object)}))
    given += [
        ("guided_choice", {"choice": body.guided_choice}),
        ("guided_regex", {"regex": body.guided_regex}),
        ("guided_json", {"json": body.guided_json}),
    ]
    if (fmt := body.response_format) is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise TranslationError(
                "invalid_request", 'response_format json_schema needs `json_schema: {"schema": {...}}`'
            )
        given.append(("response_format", {"json": fmt.json_schema.schema}))
    given = [
        (field, kwargs) for field, kwargs in given if any(v not in (None, False) for v in kwargs.values())
    ]
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(field for field, _ in given)
        raise TranslationError("invalid_request", f"give at most one output constraint; got {names}")
    field, kwargs = given[0]
    try:
        return StructuredOutputs(**kwargs)
    except ValueError as e:
        raise TranslationError("invalid_structured_output", f"{field}: {e}") from None


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
