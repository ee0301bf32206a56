"""A wire request's sampling fields -> the engine's SamplingParams, with vLLM's checks on them.

Part of the wire-to-engine translation (service/translate.py): the job's own value wins, then
the checkpoint's generation_config.json defaults, then OpenAI's; the one output constraint of
vLLM's or OpenAI's fields becomes the engine's StructuredOutputs.
"""

from __future__ import annotations

from collections.abc import Mapping

from engine import SamplingParams, SamplingParamsError, StructuredOutputs
from schemas.openai import ChatCompletionRequest, CompletionRequest
from service.fields import TranslationError
from service.tools import ToolError, tool_constraint


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    default_max_tokens: int,
    generation_defaults: Mapping[str, float | int] | None = None,
    reasoning_parser: str = "none",
) -> SamplingParams:
    """The body's SamplingParams; TranslationError (naming the field) for values that cannot go together.

    generation_defaults: the checkpoint's sampling defaults (generation_config.json, by
    SamplingParams field). A harmony chat job's output keeps its special tokens: they are the
    channel tags the reasoning parser splits on."""
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
            max_tokens=max_tokens_of(body, default_max_tokens, defaults),
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
    except SamplingParamsError as e:
        raise TranslationError("invalid_request", str(e), param=_wire_name(e.field, body)) from None
    except ValueError as e:
        raise TranslationError("invalid_request", str(e)) from None
    _check_greedy_choice(body, params)
    return params


def max_tokens_of(
    body: ChatCompletionRequest | CompletionRequest,
    default_max_tokens: int,
    generation_defaults: Mapping[str, float | int] | None = None,
) -> int:
    """The max_tokens a job runs with: its own (max_tokens or max_completion_tokens), else the
    checkpoint's (generation_config.json's max_new_tokens), else the service's default_max_tokens.
    The one rule: the job's limits are checked against what runs (service/limits.py)."""
    return body.output_limit or int((generation_defaults or {}).get("max_tokens") or default_max_tokens)


def _wire_name(field: str, body: ChatCompletionRequest | CompletionRequest) -> str:
    """The request field behind a SamplingParams field: the same name, but for the number of
    alternatives (chat asks for it as top_logprobs) and the output limit (max_completion_tokens)."""
    if field == "logprobs" and isinstance(body, ChatCompletionRequest):
        return "top_logprobs"
    if field == "max_tokens" and getattr(body, "max_completion_tokens", None) is not None:
        return "max_completion_tokens"
    return field


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


# fields that shape token-by-token decoding, which a greedy choice skips (it is scored), with the
# values that change nothing
_DECODING_FIELDS = {
    "logit_bias": None,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
}


def _check_greedy_choice(body, params: SamplingParams) -> None:
    """Refuses what the job itself set, not what the checkpoint's generation_config.json defaults
    resolved to (Qwen2.5-Instruct's repetition_penalty 1.05 is no request of the job's)."""
    spec = params.structured_outputs
    if not params.is_greedy or spec is None or spec.choice is None:
        return
    for name, neutral in _DECODING_FIELDS.items():
        if getattr(body, name, None) not in (neutral, None) and getattr(body, name) != {}:
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
                "invalid_request",
                'response_format json_schema needs `json_schema: {"schema": {...}}`',
                param="response_format.json_schema",
            )
        given.append(("response_format", {"json": fmt.json_schema.schema}))
    given = [
        (field, kwargs) for field, kwargs in given if any(v not in (None, False) for v in kwargs.values())
    ]
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(field for field, _ in given)
        raise TranslationError(  # the second one given is the one too many
            "invalid_request", f"give at most one output constraint; got {names}", param=given[1][0]
        )
    field, kwargs = given[0]
    try:
        return StructuredOutputs(**kwargs)
    except ValueError as e:
        raise TranslationError("invalid_structured_output", f"{field}: {e}") from None
