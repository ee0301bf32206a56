"""JobLimits: what one job may ask for, checked before any work is done for it.

A job is untrusted input: without bounds one record could hold the engine thread on a million
stop strings, fill the result topic's size limit with logprobs, or keep the tokenizer busy for
seconds. The limits are declared here once and nested in the configuration as
ServiceConfig.limits; each is set by its own name, a top-level key and SLUICE_<NAME>
(max_job_bytes, SLUICE_MAX_JOB_BYTES; docs/configuration.md). A job past one gets an error
result naming the field and the limit.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from schemas.batch import BatchRequestLine
from schemas.openai import ChatCompletionRequest, CompletionRequest
from service.fields import TranslationError


class JobLimits(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one job may ask for; the limits that depend on the model take its max_model_len."""

    max_job_bytes: Annotated[int, Meta(ge=1)] = 1_048_576  # a record's value; larger: job_too_large (413)
    max_prompt_tokens: Annotated[int, Meta(ge=0)] = 0  # 0: what the model takes (max_model_len - 1)
    max_stop_strings: Annotated[int, Meta(ge=0)] = 16
    max_stop_string_chars: Annotated[int, Meta(ge=1)] = 256  # each stop string
    max_stop_token_ids: Annotated[int, Meta(ge=0)] = 64
    # a `choice` constraint's choices (each is scored: one prefill per choice)
    max_choices: Annotated[int, Meta(ge=1)] = 256
    # max_tokens x (top_logprobs + 1) x samples (best_of, else n), for jobs asking for logprobs
    max_logprob_tokens: Annotated[int, Meta(ge=1)] = 16_384
    max_logit_bias: Annotated[int, Meta(ge=0)] = 300  # logit_bias entries (OpenAI's limit)
    # prompt text (and every string a chat template renders) may spell control tokens (`</s>`,
    # `<|eot_id|>`): for trusted producers only
    allow_special_tokens: bool = False
    # A job's own `chat_template` is code: refused by name unless allowed; where allowed it renders in a
    # sandbox process (service/template_sandbox.py) within these limits, else its job gets limit_exceeded
    allow_job_chat_template: bool = False
    chat_template_timeout_s: Annotated[float, Meta(gt=0)] = 2.0  # wall clock per render
    max_chat_template_memory_bytes: Annotated[int, Meta(ge=16_777_216)] = 268_435_456  # address space
    max_chat_template_chars: Annotated[int, Meta(ge=1)] = 4_194_304  # the rendered prompt

    def prompt_token_limit(self, max_model_len: int | None) -> int | None:
        """The most prompt tokens a job may have on an engine of `max_model_len`; None: no limit known."""
        model_limit = None if max_model_len is None else max_model_len - 1
        if self.max_prompt_tokens and model_limit is not None:
            return min(self.max_prompt_tokens, model_limit)
        return self.max_prompt_tokens or model_limit


def output_tokens(max_tokens: int, num_prompt_tokens: int, max_model_len: int | None) -> int:
    """`max_tokens` as the engine will run it: no more than the model's length leaves."""
    if max_model_len is None:
        return max_tokens
    return max(1, min(max_tokens, max_model_len - num_prompt_tokens))


def check_job_size(value: bytes, limits: JobLimits) -> None:
    if len(value) > limits.max_job_bytes:
        raise TranslationError(
            "job_too_large",
            f"the job has {len(value)} bytes; this service takes at most {limits.max_job_bytes}",
            413,
        )


def check_limits(
    job: BatchRequestLine, limits: JobLimits, max_tokens: int, max_model_len: int | None
) -> None:
    """TranslationError(limit_exceeded, param=the field) for the first limit the job passes.

    `max_tokens`: what the job runs with (service/sampling.py's max_tokens_of), before the
    engine clips it to `max_model_len`, the engine's prompt + output tokens."""
    body = job.body
    stops = body.stop_strings
    _check(len(stops), limits.max_stop_strings, "stop", "stop strings")
    _check(
        max(map(len, stops), default=0), limits.max_stop_string_chars, "stop", "characters per stop string"
    )
    _check(len(body.stop_token_ids or ()), limits.max_stop_token_ids, "stop_token_ids", "ids")
    _check(len(body.logit_bias or ()), limits.max_logit_bias, "logit_bias", "entries")
    for param, choices in _choice_lists(body):
        _check(len(choices), limits.max_choices, param, "choices")
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, list):
        check_prompt_tokens(len(body.prompt), limits, max_model_len)
    if (top := body.num_top_logprobs) is not None:
        # every sample draws its logprobs, the best_of - n that are not returned too
        samples = body.best_of or body.n
        volume = output_tokens(max_tokens, 1, max_model_len) * (top + 1) * samples
        what = "logprobs in all (max_tokens x (top + 1) x samples)"
        _check(volume, limits.max_logprob_tokens, "logprobs", what)


def check_prompt_tokens(num_tokens: int, limits: JobLimits, max_model_len: int | None) -> None:
    limit = limits.prompt_token_limit(max_model_len)
    if limit is not None and num_tokens > limit:
        raise TranslationError(
            "invalid_prompt", f"the prompt has {num_tokens} tokens; this service takes at most {limit}"
        )


def _choice_lists(body: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, list[str]]]:
    lists = [("guided_choice", body.guided_choice)]
    if body.structured_outputs is not None:
        lists.append(("structured_outputs.choice", body.structured_outputs.choice))
    return [(param, choices) for param, choices in lists if choices is not None]


def _check(value: int, limit: int, param: str, what: str) -> None:
    if value > limit:
        message = f"{param}: this service takes at most {limit} {what}, got {value}"
        raise TranslationError("limit_exceeded", message, param=param)
