"""The field policy: every request body field of OpenAI's and vLLM's schemas, honoured or refused.

A field is `honoured` (it does what OpenAI or vLLM says it does), `no effect` (metadata that
does not change the answer: accepted and documented as such), or `refused`: a job that sets it
to anything but its default gets a 400 error result, `unsupported_parameter`, that names it
(`param`). Never ignored. docs/wire-format.md carries this table row for row (a test keeps them
equal); fields no schema declares are unknown, refused by default (`unknown_fields`, schemas/codec.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from schemas.embeddings import EmbeddingRequest
from schemas.openai import ChatCompletionRequest, CompletionRequest
from schemas.responses_api import ResponsesRequest

# both: chat and completions
Endpoint = Literal["both", "chat", "completions", "embeddings", "responses"]


class TranslationError(ValueError):
    """A decodable job this service cannot run as asked. `code` goes into the error result;
    `param` names the body field at fault (OpenAI's error `param`), where there is one."""

    def __init__(self, code: str, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.param = param  # the request field at fault, when there is one


class UnsupportedParameter(TranslationError):
    """A field the policy refuses (or a refused part of an honoured one), named by its path."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__("unsupported_parameter", message, param=param)


@dataclass(frozen=True, slots=True)
class FieldRule:
    name: str
    endpoint: Endpoint
    status: Literal["honoured", "no effect", "refused"]
    note: str = ""
    # refused fields, and honoured ones with values refused: the values that are fine
    accepts: Callable[[Any], bool] | None = None

    def refuses(self, value: Any) -> bool:
        if self.accepts is not None:
            return not self.accepts(value)
        return self.status == "refused" and value is not None

    @property
    def markdown(self) -> str:
        """The rule as a row of docs/wire-format.md's table."""
        return f"| `{self.name}` | {self.endpoint} | {self.status} | {self.note} |".replace("|  |", "| |")


def _default(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in values


# field | endpoint | status | note: the table of docs/wire-format.md, row for row
_TABLE = """
| `model` | both | honoured | the served model name, an alias (`model_aliases`) or a LoRA adapter's name (`lora_adapters`: the job runs with that adapter and its result's `model` is the adapter's name); empty: the served model; otherwise a 404 `model_not_found` |
| `max_tokens` | both | honoured | default: generation_config.json's `max_new_tokens`, else `default_max_tokens` |
| `temperature` | both | honoured | default: generation_config.json's, else 1 |
| `top_p` | both | honoured | default: generation_config.json's, else 1; one below float32's smallest normal (2^-126) is raised to it: either way only the top token is kept |
| `n` | both | honoured | 1 to 128 parallel samples sharing the prompt's KV blocks; seeded: sample i uses seed + i; greedy (temperature 0) takes only 1, as vLLM |
| `stop` | both | honoured | an empty stop string is refused (vLLM's rule) |
| `seed` | both | honoured | |
| `presence_penalty` | both | honoured | |
| `frequency_penalty` | both | honoured | |
| `logit_bias` | both | honoured | token id (as a string) -> bias in [-100, 100], added to the logits |
| `response_format` | both | honoured | `text`, `json_object`, `json_schema`; `structural_tag` refused |
| `echo` | both | honoured | completions: the prompt before the text (refused with `logprobs`); chat: a final assistant message before the new content |
| `stream` | both | refused | only false: results are whole lines |
| `stream_options` | both | refused | |
| `user` | both | no effect | OpenAI's end-user id for abuse monitoring |
| `metadata` | both | no effect | |
| `store` | both | no effect | |
| `service_tier` | both | no effect | |
| `safety_identifier` | both | no effect | |
| `prompt_cache_key` | both | no effect | the prefix cache needs no key |
| `prompt_cache_retention` | both | no effect | |
| `best_of` | both | honoured | samples best_of (n to 128), returns the n with the highest logprob per token (OpenAI's "best"; vLLM ranks by the sum); greedy takes only 1 |
| `use_beam_search` | both | refused | only false |
| `length_penalty` | both | refused | only 1 (beam search only) |
| `structured_outputs` | both | honoured | `choice`, `regex`, `json`, `json_object`; `grammar`, `structural_tag` and the backend options refused |
| `guided_choice` | both | honoured | |
| `guided_regex` | both | honoured | |
| `guided_json` | both | honoured | |
| `guided_grammar` | both | refused | |
| `structural_tag` | both | refused | |
| `guided_decoding_backend` | both | refused | |
| `guided_whitespace_pattern` | both | refused | |
| `top_k` | both | honoured | default: generation_config.json's, else off |
| `min_p` | both | honoured | default: generation_config.json's, else 0; applied before top_k and top_p, as vLLM |
| `repetition_penalty` | both | honoured | default: generation_config.json's, else 1; in [1e-4, 1e4], where float32 logits stay finite |
| `ignore_eos` | both | honoured | |
| `min_tokens` | both | honoured | EOS and stop tokens held back, stop strings not checked before it |
| `skip_special_tokens` | both | honoured | |
| `spaces_between_special_tokens` | both | refused | only true |
| `include_stop_str_in_output` | both | honoured | |
| `truncate_prompt_tokens` | both | honoured | keeps the prompt's last k tokens |
| `add_special_tokens` | both | honoured | default: false for chat (the template has them), true for completions |
| `return_tokens_as_token_ids` | both | honoured | logprob tokens as `token_id:N` |
| `priority` | both | honoured | an integer in [-1000, 1000], lower runs first; a waiting job gains a level every `priority_aging_steps` engine steps |
| `stop_token_ids` | both | honoured | |
| `request_id` | both | no effect | Sluice names its requests itself |
| `prompt_logprobs` | both | refused | |
| `allowed_token_ids` | both | refused | |
| `bad_words` | both | refused | |
| `logits_processors` | both | refused | |
| `return_token_ids` | both | refused | |
| `cache_salt` | both | refused | |
| `kv_transfer_params` | both | refused | |
| `vllm_xargs` | both | refused | |
| `max_repetition_pattern_size` | both | refused | only 0 (vLLM's repetitive-pattern stop) |
| `min_repetition_pattern_size` | both | refused | only 0 (vLLM's repetitive-pattern stop) |
| `repetition_min_count` | both | refused | only 0 (vLLM's repetitive-pattern stop) |
| `sluice_deadline_ms` | both | honoured | Sluice's: Unix ms after which the job is not run |
| `messages` | chat | honoured | text content (parts joined with newlines), `name`, assistant `tool_calls`, tool `tool_call_id`; other part types refused |
| `max_completion_tokens` | chat | honoured | |
| `logprobs` | both | honoured | chat: true/false; completions: the number of alternatives (each position's `top_logprobs` also holds the sampled token, first: up to N+1 entries, as OpenAI and vLLM give them; `0` gives the sampled token alone) |
| `top_logprobs` | chat | honoured | needs `logprobs: true` |
| `tools` | chat | honoured | rendered by the chat template; calls parsed by `tool_call_parser` (hermes, llama3_json, harmony); `function.strict: true` honoured under `tool_choice` `required` or a named function (the grammar holds the arguments to the schema), refused under `auto` and `none` |
| `tool_choice` | chat | honoured | `none`, `auto` (parsed), `required` and a named function (both constrained by a JSON schema) |
| `parallel_tool_calls` | chat | honoured | false: at most one call |
| `add_generation_prompt` | chat | honoured | |
| `continue_final_message` | chat | honoured | the last message is continued, not closed |
| `chat_template` | chat | honoured | a Jinja chat template for this job, where the operator allows it (`allow_job_chat_template`; otherwise refused by name, `unsupported_parameter`); rendered in a sandbox process within a time, a memory and an output-size limit, past which the job gets `limit_exceeded` naming the limit |
| `chat_template_kwargs` | chat | honoured | extra variables for the template, e.g. `enable_thinking` |
| `documents` | chat | honoured | passed to the chat template |
| `functions` | chat | refused | |
| `function_call` | chat | refused | |
| `modalities` | chat | refused | only `["text"]` |
| `audio` | chat | refused | |
| `prediction` | chat | refused | |
| `web_search_options` | chat | refused | |
| `reasoning_effort` | chat | refused | |
| `verbosity` | chat | refused | |
| `include_reasoning` | chat | honoured | false: the reasoning a `reasoning_parser` split off is dropped; true (default): returned as `message.reasoning_content` and `message.reasoning` |
| `mm_processor_kwargs` | chat | refused | |
| `prompt` | completions | honoured | text or token ids (one prompt per job) |
| `suffix` | completions | refused | |
| `prompt_embeds` | completions | refused | |
| `input` | embeddings | honoured | a string, strings, token ids or token-id lists; each one embedded on its own |
| `model` | embeddings | honoured | as for chat and completions |
| `encoding_format` | embeddings | honoured | `float` or `base64` (little-endian float32) |
| `dimensions` | embeddings | honoured | the first `dimensions` components, renormalised |
| `user` | embeddings | no effect | |
| `truncate_prompt_tokens` | embeddings | honoured | keeps each input's last k tokens |
| `add_special_tokens` | embeddings | honoured | default: true |
| `priority` | embeddings | honoured | an integer in [-1000, 1000], lower runs first |
| `request_id` | embeddings | no effect | Sluice names its requests itself |
| `normalize` | embeddings | refused | only true: every vector is unit length |
| `embed_dtype` | embeddings | refused | only `float32` |
| `endianness` | embeddings | refused | only `little` or `native` (base64 is little-endian float32) |
| `sluice_deadline_ms` | embeddings | honoured | Sluice's: Unix ms after which the job is not run |
| `input` | responses | honoured | a string (one user message) or a list of items: messages (roles `system`, `developer`, `user`, `assistant`; `input_text` and `output_text` parts, joined with newlines), `function_call` and `function_call_output` items; other item and part types refused by path (`input[i]`, `input[i].content[j]`) |
| `model` | responses | honoured | as for chat and completions |
| `instructions` | responses | honoured | a system message before the input |
| `max_output_tokens` | responses | honoured | the output's bound, reasoning included; cut there: `status` `incomplete`, `incomplete_details.reason` `max_output_tokens` |
| `temperature` | responses | honoured | as for chat |
| `top_p` | responses | honoured | as for chat |
| `top_logprobs` | responses | honoured | 0 to 20 alternatives per token; needs `include: ["message.output_text.logprobs"]` |
| `include` | responses | honoured | `message.output_text.logprobs` only: each `output_text` part's `logprobs`; any other value refused |
| `text` | responses | honoured | `format` `text`, `json_object` or `json_schema` (`name`, `schema`, `strict`), as chat's `response_format`; `verbosity` only `medium` |
| `tools` | responses | honoured | `function` tools (`name`, `description`, `parameters`, `strict`), as chat's `tools` (`strict: true` likewise only under `tool_choice` `required` or a named function); built-in tools (`web_search`, `file_search`, `code_interpreter`, `mcp`, ...) refused by path, `tools[i]` |
| `tool_choice` | responses | honoured | `none`, `auto`, `required`, `{"type": "function", "name": F}`; hosted-tool and `allowed_tools` choices refused |
| `parallel_tool_calls` | responses | honoured | false: at most one call |
| `reasoning` | responses | honoured | `effort` where the chat template reads one: GPT-OSS's `reasoning_effort` (`low`, `medium`, `high`), Qwen3's `enable_thinking` (off for `none` and `minimal`, on otherwise); refused for other models; `summary` refused; the reasoning comes back as a `reasoning` output item |
| `seed` | responses | honoured | |
| `priority` | responses | honoured | an integer in [-1000, 1000], lower runs first |
| `sluice_deadline_ms` | responses | honoured | Sluice's: Unix ms after which the job is not run |
| `metadata` | responses | no effect | echoed in the Response |
| `user` | responses | no effect | echoed in the Response |
| `safety_identifier` | responses | no effect | |
| `prompt_cache_key` | responses | no effect | the prefix cache needs no key |
| `prompt_cache_retention` | responses | no effect | |
| `service_tier` | responses | no effect | |
| `store` | responses | refused | only false: Sluice keeps no responses (absent: not stored) |
| `previous_response_id` | responses | refused | Sluice keeps no responses: send the conversation as `input` items |
| `conversation` | responses | refused | Sluice keeps no conversations |
| `background` | responses | refused | only false: every job runs in the background already |
| `background_options` | responses | refused | |
| `prompt` | responses | refused | Sluice keeps no prompt templates |
| `stream` | responses | refused | only false: results are whole lines |
| `stream_options` | responses | refused | |
| `truncation` | responses | refused | only `disabled`: a prompt too long is refused (`invalid_prompt`) |
| `max_tool_calls` | responses | refused | |
| `context_management` | responses | refused | |
| `moderation` | responses | refused | |
| `image` | responses | refused | |
| `access_programs` | responses | refused | |
| `prompt_cache_options` | responses | refused | |
"""

# the values a refused field may still have (its default), and the values an honoured field refuses;
# by name, or by (name, endpoint) where the endpoints differ
_ACCEPTS: dict[str | tuple[str, str], Callable[[Any], bool]] = {
    "stream": _default(False),
    "use_beam_search": _default(False),
    "length_penalty": _default(1, 1.0),
    "spaces_between_special_tokens": _default(True),
    "bad_words": lambda value: not value,
    "return_token_ids": _default(False),
    "max_repetition_pattern_size": _default(0),
    "min_repetition_pattern_size": _default(0),
    "repetition_min_count": _default(0),
    "modalities": lambda value: value in (None, ["text"]),
    "include_reasoning": lambda value: value is None or isinstance(value, bool),
    "normalize": _default(True),
    "embed_dtype": _default("float32"),
    "endianness": _default("little", "native"),
    "background": _default(False),
    "truncation": _default("disabled"),
    ("store", "responses"): _default(False),  # chat's store has no effect; a Response would be kept
}


def _parse(table: str) -> tuple[FieldRule, ...]:
    rules = []
    for row in table.strip().splitlines():
        name, endpoint, status, note = (cell.strip() for cell in row.strip()[1:-1].split("|", 3))
        name = name.strip("`")
        rules.append(
            FieldRule(name, endpoint, status, note, _ACCEPTS.get((name, endpoint), _ACCEPTS.get(name)))
        )
    return tuple(rules)


FIELD_RULES: tuple[FieldRule, ...] = _parse(_TABLE)

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


def check_fields(body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> None:
    """Raises UnsupportedParameter for the first refused field the body sets."""
    for rule in rules_for(type(body)):
        if rule.refuses(value := getattr(body, rule.name)):
            why = f": {rule.note}" if rule.note else ""
            raise UnsupportedParameter(rule.name, f"`{rule.name}` = {value!r} is not supported{why}")
    if isinstance(body, EmbeddingRequest):
        return
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
        _check_strict_tools(body)


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


def _check_strict_tools(body: ChatCompletionRequest) -> None:
    """`strict: true` promises arguments that match the schema. Only "required" and a named
    function constrain the output by the tools' schemas; under "auto" the model's call is parsed
    from free text (the engine has no grammar that starts when a call does), so it is refused."""
    if body.tool_choice not in (None, "auto", "none"):
        return
    for i, tool in enumerate(body.tools or ()):
        if tool.function.strict:
            choice = body.tool_choice or "auto"
            raise UnsupportedParameter(
                f"tools[{i}].function.strict",
                f"tools[{i}].function.strict = true is not supported with tool_choice {choice!r}: "
                'the arguments are not constrained there; use tool_choice "required" or a named '
                "function, where the arguments are held to the schema",
            )


def rules_for(body_type: type) -> list[FieldRule]:
    """The rules of one endpoint's body type (the table's rows that apply to it)."""
    if body_type is EmbeddingRequest:
        return [rule for rule in FIELD_RULES if rule.endpoint == "embeddings"]
    if body_type is ResponsesRequest:
        return [rule for rule in FIELD_RULES if rule.endpoint == "responses"]
    endpoint = "chat" if body_type is ChatCompletionRequest else "completions"
    return [rule for rule in FIELD_RULES if rule.endpoint in ("both", endpoint)]
