"""The one place where the wire format meets the engine.

wire request -> (prompt token ids, SamplingParams); engine output -> wire result line.
"""

from __future__ import annotations

import re
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


def to_engine_request(
    job: BatchRequestLine, tokenizer, default_max_tokens: int, allow_special_tokens: bool = False
) -> EngineRequest:
    """The job as the engine's request. Prompt text is the user's text: a control token it spells
    (`</s>`, `<|eot_id|>`) is tokenised as text unless `allow_special_tokens` (trusted producers)."""
    body = job.body
    prompt_token_ids = _prompt_token_ids(body, tokenizer, allow_special_tokens)
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


def to_error_line(
    custom_id: str, code: str, message: str, status_code: int = 400, param: str | None = None
) -> BatchResponseLine:
    """A failed job: OpenAI's error body under its status code, and the top-level error."""
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=custom_id,
        response=BatchResponse(
            status_code=status_code,
            request_id=f"req-{uuid.uuid4().hex}",
            body=ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code)),
        ),
        error=BatchError(code=code, message=message),
    )


def _prompt_token_ids(
    body: ChatCompletionRequest | CompletionRequest, tokenizer, allow_special: bool
) -> list[int]:
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            return list(body.prompt)
        return tokenizer.encode(body.prompt, split_special_tokens=not allow_special)
    if not tokenizer.chat_template:
        raise TranslationError("unsupported_endpoint", "this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    rendered = _render_chat(tokenizer, messages)
    if allow_special or not _spells_special_token([m["content"] for m in messages], tokenizer):
        # The rendered template already holds the BOS token where the model wants one.
        return tokenizer.encode(rendered, add_special_tokens=False)
    return _encode_contents_as_text(rendered, messages, tokenizer)


def _render_chat(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may reject a role order; its message says which
        raise TranslationError("invalid_request", f"the chat template rejected the messages: {e}") from None


def _spells_special_token(texts: list[str], tokenizer) -> bool:
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.update(tokenizer.all_special_tokens)
    return any(special in text for text in texts for special in specials if special)


def _encode_contents_as_text(rendered: str, messages: list[dict], tokenizer) -> list[int]:
    """The rendered chat with the template's own text (and control tokens) as the template wrote
    it, and each message's content with its special-token spellings as plain text.

    A rendering with a marker for each content says which parts of `rendered` are the template's;
    the parts between them must be the contents (verbatim, or trimmed as some templates do)."""
    marked = _render_chat(tokenizer, [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
    parts = re.split("\ue000([0-9]+)\ue001", marked)  # template text, content index, template text, ...
    ids = tokenizer.encode(parts[0], add_special_tokens=False)
    pos = len(parts[0])
    if not rendered.startswith(parts[0]):
        raise _template_changes_content()
    for index, template_text in zip(parts[1::2], parts[2::2], strict=True):
        content = messages[int(index)]["content"]
        text = next(
            (t for t in (content, content.strip()) if rendered.startswith(t + template_text, pos)), None
        )
        if text is None:
            raise _template_changes_content()
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        ids += tokenizer.encode(template_text, add_special_tokens=False)
        pos += len(text) + len(template_text)
    if pos != len(rendered):
        raise _template_changes_content()
    return ids


def _template_changes_content() -> TranslationError:
    return TranslationError(
        "invalid_request",
        "the chat template changes a message's text, so its special-token spellings cannot be kept as "
        "text; remove them, or ask the operator for allow_special_tokens",
    )


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
