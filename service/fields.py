"""The field policy: every request body field of OpenAI's and vLLM's schemas, honoured or refused.

A field is `honoured` (it does what OpenAI or vLLM says it does), `no effect` (metadata that
does not change the answer: accepted and documented as such), or `refused`: a job that sets it
to anything but its default gets a 400 error result, `unsupported_parameter`, that names it
(`param`). Never ignored. docs/wire-format.md carries this table (a test keeps them equal);
fields no schema declares are unknown, refused by default (`unknown_fields`, schemas/codec.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from schemas.embeddings import EmbeddingRequest
from schemas.openai import ChatCompletionRequest, CompletionRequest

Endpoint = Literal["both", "chat", "completions", "embeddings"]  # both: chat and completions


@dataclass(frozen=True, slots=True)
class FieldRule:
    name: str
    status: Literal["honoured", "no effect", "refused"]
    note: str = ""
    endpoint: Endpoint = "both"
    # refused fields, and honoured ones with values refused: the values that are fine
    accepts: Callable[[Any], bool] | None = None

    def refuses(self, value: Any) -> bool:
        if self.accepts is not None:
            return not self.accepts(value)
        return self.status == "refused" and value is not None


def _default(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in values


FIELD_RULES: tuple[FieldRule, ...] = (
    # OpenAI, both endpoints
    FieldRule(
        "model",
        "honoured",
        "the served model name or an alias (`model_aliases`); empty: the served model; otherwise a 404 `model_not_found`",
    ),
    FieldRule(
        "max_tokens",
        "honoured",
        "default: generation_config.json's `max_new_tokens`, else `default_max_tokens`",
    ),
    FieldRule("temperature", "honoured", "default: generation_config.json's, else 1"),
    FieldRule("top_p", "honoured", "default: generation_config.json's, else 1"),
    FieldRule(
        "n",
        "honoured",
        "parallel samples sharing the prompt's KV blocks; seeded: sample i uses seed + i; "
        "greedy (temperature 0) takes only 1, as vLLM",
    ),
    FieldRule("stop", "honoured"),
    FieldRule("seed", "honoured"),
    FieldRule("presence_penalty", "honoured"),
    FieldRule("frequency_penalty", "honoured"),
    FieldRule("logit_bias", "honoured", "token id (as a string) -> bias in [-100, 100], added to the logits"),
    FieldRule(
        "response_format", "honoured", "`text`, `json_object`, `json_schema`; `structural_tag` refused"
    ),
    FieldRule(
        "echo",
        "honoured",
        "completions: the prompt before the text (refused with `logprobs`); chat: a final assistant message before the new content",
    ),
    FieldRule("stream", "refused", "only false: results are whole lines", accepts=_default(False)),
    FieldRule("stream_options", "refused"),
    FieldRule("user", "no effect", "OpenAI's end-user id for abuse monitoring"),
    FieldRule("metadata", "no effect"),
    FieldRule("store", "no effect"),
    FieldRule("service_tier", "no effect"),
    FieldRule("safety_identifier", "no effect"),
    FieldRule("prompt_cache_key", "no effect", "the prefix cache needs no key"),
    FieldRule("prompt_cache_retention", "no effect"),
    # vLLM's extra fields, both endpoints
    FieldRule(
        "best_of",
        "honoured",
        "samples best_of (>= n), returns the n with the highest cumulative logprob; greedy takes only 1",
    ),
    FieldRule("use_beam_search", "refused", "only false", accepts=_default(False)),
    FieldRule("length_penalty", "refused", "only 1 (beam search only)", accepts=_default(1, 1.0)),
    FieldRule(
        "structured_outputs",
        "honoured",
        "`choice`, `regex`, `json`, `json_object`; `grammar`, `structural_tag` and the backend options refused",
    ),
    FieldRule("guided_choice", "honoured"),
    FieldRule("guided_regex", "honoured"),
    FieldRule("guided_json", "honoured"),
    FieldRule("guided_grammar", "refused"),
    FieldRule("structural_tag", "refused"),
    FieldRule("guided_decoding_backend", "refused"),
    FieldRule("guided_whitespace_pattern", "refused"),
    FieldRule("top_k", "honoured", "default: generation_config.json's, else off"),
    FieldRule("min_p", "honoured", "default: generation_config.json's, else 0"),
    FieldRule("repetition_penalty", "honoured", "default: generation_config.json's, else 1"),
    FieldRule("ignore_eos", "honoured"),
    FieldRule("min_tokens", "honoured", "EOS and stop tokens held back, stop strings not checked before it"),
    FieldRule("skip_special_tokens", "honoured"),
    FieldRule("spaces_between_special_tokens", "refused", "only true", accepts=_default(True)),
    FieldRule("include_stop_str_in_output", "honoured"),
    FieldRule("truncate_prompt_tokens", "honoured", "keeps the prompt's last k tokens"),
    FieldRule(
        "add_special_tokens",
        "honoured",
        "default: false for chat (the template has them), true for completions",
    ),
    FieldRule("return_tokens_as_token_ids", "honoured", "logprob tokens as `token_id:N`"),
    FieldRule("priority", "honoured", "lower runs first"),
    FieldRule("stop_token_ids", "honoured"),
    FieldRule("request_id", "no effect", "Sluice names its requests itself"),
    FieldRule("prompt_logprobs", "refused"),
    FieldRule("allowed_token_ids", "refused"),
    FieldRule("bad_words", "refused", accepts=lambda value: not value),
    FieldRule("logits_processors", "refused"),
    FieldRule("return_token_ids", "refused", accepts=_default(False)),
    FieldRule("cache_salt", "refused"),
    FieldRule("kv_transfer_params", "refused"),
    FieldRule("vllm_xargs", "refused"),
    FieldRule("sluice_deadline_ms", "honoured", "Sluice's: Unix ms after which the job is not run"),
    # chat only
    FieldRule(
        "messages",
        "honoured",
        "text content (parts joined with newlines), `name`, assistant `tool_calls`, tool `tool_call_id`; other part types refused",
        "chat",
    ),
    FieldRule("max_completion_tokens", "honoured", endpoint="chat"),
    FieldRule("logprobs", "honoured", "chat: true/false; completions: the number of alternatives"),
    FieldRule("top_logprobs", "honoured", "needs `logprobs: true`", "chat"),
    FieldRule(
        "tools",
        "honoured",
        "rendered by the chat template; calls parsed by `tool_call_parser` (hermes, llama3_json)",
        "chat",
    ),
    FieldRule(
        "tool_choice",
        "honoured",
        "`none`, `auto` (parsed), `required` and a named function (both constrained by a JSON schema)",
        "chat",
    ),
    FieldRule("parallel_tool_calls", "honoured", "false: at most one call", "chat"),
    FieldRule("add_generation_prompt", "honoured", endpoint="chat"),
    FieldRule("continue_final_message", "honoured", "the last message is continued, not closed", "chat"),
    FieldRule("chat_template", "honoured", "a Jinja chat template for this job", "chat"),
    FieldRule(
        "chat_template_kwargs", "honoured", "extra variables for the template, e.g. `enable_thinking`", "chat"
    ),
    FieldRule("documents", "honoured", "passed to the chat template", "chat"),
    FieldRule("functions", "refused", endpoint="chat"),
    FieldRule("function_call", "refused", endpoint="chat"),
    FieldRule(
        "modalities", "refused", 'only `["text"]`', "chat", accepts=lambda value: value in (None, ["text"])
    ),
    FieldRule("audio", "refused", endpoint="chat"),
    FieldRule("prediction", "refused", endpoint="chat"),
    FieldRule("web_search_options", "refused", endpoint="chat"),
    FieldRule("reasoning_effort", "refused", endpoint="chat"),
    FieldRule("verbosity", "refused", endpoint="chat"),
    FieldRule(
        "include_reasoning",
        "honoured",
        "false: the reasoning a `reasoning_parser` split off is dropped; true (default): returned as "
        "`message.reasoning_content` and `message.reasoning`",
        "chat",
        accepts=lambda value: value is None or isinstance(value, bool),
    ),
    FieldRule("mm_processor_kwargs", "refused", endpoint="chat"),
    # completions only
    FieldRule("prompt", "honoured", "text or token ids (one prompt per job)", "completions"),
    FieldRule("suffix", "refused", endpoint="completions"),
    FieldRule("prompt_embeds", "refused", endpoint="completions"),
    # embeddings (none of the rows above apply to them)
    FieldRule(
        "input",
        "honoured",
        "a string, strings, token ids or token-id lists; each one embedded on its own",
        "embeddings",
    ),
    FieldRule("model", "honoured", "as for chat and completions", "embeddings"),
    FieldRule("encoding_format", "honoured", "`float` or `base64` (little-endian float32)", "embeddings"),
    FieldRule("dimensions", "honoured", "the first `dimensions` components, renormalised", "embeddings"),
    FieldRule("user", "no effect", endpoint="embeddings"),
    FieldRule("truncate_prompt_tokens", "honoured", "keeps each input's last k tokens", "embeddings"),
    FieldRule("add_special_tokens", "honoured", "default: true", "embeddings"),
    FieldRule("priority", "honoured", "lower runs first", "embeddings"),
    FieldRule("request_id", "no effect", "Sluice names its requests itself", "embeddings"),
    FieldRule(
        "sluice_deadline_ms", "honoured", "Sluice's: Unix ms after which the job is not run", "embeddings"
    ),
)

# message fields: besides role, content, name, tool_calls and tool_call_id, read only to be refused
REFUSED_MESSAGE_FIELDS = ("refusal", "audio", "function_call", "reasoning_content")
REFUSED_STRUCTURED_OUTPUTS = (
    "grammar",
    "structural_tag",
    "disable_any_whitespace",
    "disable_fallback",
    "disable_additional_properties",
    "whitespace_pattern",
)


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def check_fields(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Raises UnsupportedParameter for the first refused field the body sets."""
    endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
    for rule in FIELD_RULES:
        if rule.endpoint in ("both", endpoint) and rule.refuses(value := getattr(body, rule.name)):
            why = f": {rule.note}" if rule.note else ""
            raise UnsupportedParameter(rule.name, f"`{rule.name}` = {value!r} is not supported{why}")
    if (so := body.structured_outputs) is not None:
        for name in REFUSED_STRUCTURED_OUTPUTS:
            if getattr(so, name) is not None:
                raise UnsupportedParameter(
                    f"structured_outputs.{name}",
                    f"structured_outputs.{name} is not supported; use choice, regex, json or json_object",
                )
    if body.response_format is not None and body.response_format.type == "structural_tag":
        raise UnsupportedParameter("response_format", "response_format `structural_tag` is not supported")
    if isinstance(body, ChatCompletionRequest):
        _check_messages(body)


def _check_messages(body: ChatCompletionRequest) -> None:
    for i, message in enumerate(body.messages):
        for name in REFUSED_MESSAGE_FIELDS:
            if getattr(message, name) is not None:
                raise UnsupportedParameter(f"messages[{i}].{name}", f"messages[{i}].{name} is not supported")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text":
                    raise UnsupportedParameter(
                        f"messages[{i}].content[{j}]",
                        f"messages[{i}].content[{j}] is a `{part.type}` part; this model reads text parts only",
                    )


def rules_for(body_type: type) -> list[FieldRule]:
    """The rules of one endpoint's body type (the table's rows that apply to it)."""
    if body_type is EmbeddingRequest:
        return [rule for rule in FIELD_RULES if rule.endpoint == "embeddings"]
    endpoint = "chat" if body_type is ChatCompletionRequest else "completions"
    return [rule for rule in FIELD_RULES if rule.endpoint in ("both", endpoint)]
