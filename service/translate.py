"""The one place where the wire format meets the engine.

wire request -> (prompt token ids, SamplingParams); engine output -> wire result line. Every
request field is honoured here or refused by name (service/fields.py holds the table).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from engine import RequestOutput, SamplingParams, StructuredOutputs
from schemas.batch import (
    SCHEMA_VERSION,
    BatchError,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    PromptTokensDetails,
    SluiceExtension,
    TextCompletion,
    Usage,
)
from service.choices import result_choices
from service.fields import UnsupportedParameter, check_fields
from service.prompts import PromptError
from service.prompts import prompt_token_ids as prompt_token_ids_of
from service.tools import ToolError, tool_constraint


class TranslationError(ValueError):
    """A decodable job this service cannot run as asked. `code` goes into the error result;
    `param` names the body field at fault (OpenAI's error `param`), where there is one."""

    def __init__(self, code: str, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.param = param  # the request field at fault, when there is one


@dataclass(slots=True)
class EngineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM's convention)


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
) -> EngineRequest:
    """The job as the engine's prompt and SamplingParams. Refuses any field it cannot honour, by name.

    generation_defaults: the checkpoint's sampling defaults (generation_config.json, by
    SamplingParams field); a field the job sets wins, then these, then OpenAI's defaults.
    Prompt text is the user's text: a control token it spells (`</s>`, `<|eot_id|>`) is
    tokenised as text unless `allow_special_tokens` (trusted producers). A harmony chat job's
    output keeps its special tokens: they are the channel tags the reasoning parser splits on."""
    body = job.body
    try:
        check_fields(body)
        prompt_token_ids = prompt_token_ids_of(body, tokenizer, allow_special_tokens)
    except UnsupportedParameter as e:
        raise TranslationError("unsupported_parameter", e.message, param=e.param) from None
    except PromptError as e:
        raise TranslationError(e.code, e.message, param=e.param) from None
    _check_combinations(body)
    try:
        structured_outputs = tool_constraint(body, _structured_outputs(body))
    except ToolError as e:
        raise TranslationError("invalid_request", e.message, param=e.param) from None
    defaults = dict(generation_defaults or {})
    temperature = _pick(body.temperature, defaults, "temperature", 1.0)
    _check_samples(body, temperature)
    try:
        params = SamplingParams(
            max_tokens=body.output_limit or int(defaults.get("max_tokens") or default_max_tokens),
            n=body.n,
            best_of=body.best_of,
            temperature=temperature,
            top_p=_pick(body.top_p, defaults, "top_p", 1.0),
            top_k=_top_k(_pick(body.top_k, defaults, "top_k", -1)),
            min_p=_pick(body.min_p, defaults, "min_p", 0.0),
            repetition_penalty=_pick(body.repetition_penalty, defaults, "repetition_penalty", 1.0),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop_strings,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=body.num_top_logprobs,
            structured_outputs=structured_outputs,
            min_tokens=body.min_tokens,
            logit_bias=_logit_bias(body.logit_bias),
            skip_special_tokens=body.skip_special_tokens and not _keeps_tags(body, reasoning_parser),
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
    except ValueError as e:
        raise TranslationError("invalid_request", str(e)) from None
    _check_greedy_choice(body, params)
    return EngineRequest(prompt_token_ids, params, body.priority)


def to_result_line(
    job: BatchRequestLine,
    output: RequestOutput,
    model_name: str,
    enqueued_time: float,
    tokenizer=None,
    tool_call_parser: str = "auto",
    reasoning_parser: str = "none",
) -> BatchResponseLine:
    """A finished engine output as an OpenAI Batch output line, with Sluice's timings.

    An output the engine aborted is not an answer: it becomes a 500 error result."""
    if output.finish_reason == "abort":
        return to_error_line(job.custom_id, "engine_error", "the engine aborted the request", 500)
    samples = output.samples or [output]
    # every returned sample's tokens (as vLLM counts them); the prompt once
    num_prompt, num_output = len(output.prompt_token_ids), sum(len(s.token_ids) for s in samples)
    usage = Usage(
        prompt_tokens=num_prompt,
        completion_tokens=num_output,
        total_tokens=num_prompt + num_output,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=output.num_cached_tokens),
    )
    # Both endpoints' bodies differ only in their id prefix and the shape of a choice.
    common = dict(
        created=int(time.time()), model=model_name, usage=usage, sluice=_extension(output, enqueued_time)
    )
    body = job.body
    choices = result_choices(body, output, samples, tokenizer, tool_call_parser, reasoning_parser)
    if isinstance(body, ChatCompletionRequest):
        response_body = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", choices=choices, **common)
    else:
        response_body = TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", choices=choices, **common)
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=job.custom_id,
        response=BatchResponse(status_code=200, request_id=f"req-{uuid.uuid4().hex}", body=response_body),
    )


def to_error_line(
    custom_id: str, code: str, message: str, status_code: int = 400, param: str | None = None
) -> BatchResponseLine:
    """A job refused as an HTTP request would be: OpenAI's error body under its status code."""
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=BatchResponse(
            status_code=status_code,
            request_id=f"req-{uuid.uuid4().hex}",
            body=ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code)),
        ),
    )


def to_failure_line(custom_id: str, code: str, message: str) -> BatchResponseLine:
    """A failure that is no HTTP error (bytes that are no job line, a deadline that passed, as
    OpenAI's `batch_expired`): no response, the top-level `error`."""
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=None,
        error=BatchError(code=code, message=message),
    )


def _pick(value, defaults: Mapping[str, float | int], name: str, fallback):
    return value if value is not None else defaults.get(name, fallback)


def _keeps_tags(body: ChatCompletionRequest | CompletionRequest, reasoning_parser: str) -> bool:
    return reasoning_parser == "harmony" and isinstance(body, ChatCompletionRequest)


def _top_k(value: int) -> int:
    return -1 if value in (None, 0) else value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token_id): value for token_id, value in bias.items()}
    except ValueError:
        raise TranslationError(
            "invalid_request", "logit_bias keys must be token ids (integers as strings)", param="logit_bias"
        ) from None


def _check_samples(body: ChatCompletionRequest | CompletionRequest, temperature: float) -> None:
    """vLLM's rules for n and best_of, with the field named."""
    n, best_of = body.n, body.best_of
    if best_of is not None and best_of < n:
        raise TranslationError(
            "invalid_request", f"best_of must be >= n, got n={n} and best_of={best_of}", param="best_of"
        )
    if temperature == 0 and (best_of or n) > 1:
        name = "n" if best_of is None else "best_of"
        raise TranslationError(
            "invalid_request", f"{name} must be 1 when using greedy sampling, got {best_of or n}", param=name
        )


def _check_combinations(body: ChatCompletionRequest | CompletionRequest) -> None:
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise TranslationError(
                "invalid_request", "top_logprobs needs logprobs: true", param="top_logprobs"
            )
    elif body.echo and body.logprobs is not None:
        raise TranslationError(
            "unsupported_parameter",
            "echo with logprobs (the prompt's logprobs) is not supported; echo alone is",
            param="echo",
        )


# fields that shape token-by-token decoding, which a greedy choice skips (it is scored)
_DECODING_FIELDS = {
    "logit_bias": None,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
}


def _check_greedy_choice(body, params: SamplingParams) -> None:
    spec = params.structured_outputs
    if not params.is_greedy or spec is None or spec.choice is None:
        return
    for name, neutral in _DECODING_FIELDS.items():
        if getattr(params, name) not in (neutral, None):
            raise TranslationError(
                "unsupported_parameter",
                f"`{name}` does not apply to a greedy choice job, whose answer is its most probable "
                "choice (scored, not decoded); drop it or sample (temperature > 0)",
                param=name,
            )


def _structured_outputs(body: ChatCompletionRequest | CompletionRequest) -> StructuredOutputs | None:
    """The one output constraint of vLLM's or OpenAI's fields; two at once is an error, not a guess."""
    given: list[tuple[str, dict]] = []  # (the field as the request spelled it, StructuredOutputs kwargs)
    if (so := body.structured_outputs) is not None:
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
