"""OpenAI response bodies: chat and text completions, their choices and logprobs, usage and errors.

Field names and meanings follow OpenAI's `/v1/chat/completions` and `/v1/completions` responses,
with vLLM's extras where vLLM has one (`stop_reason`, `prompt_tokens_details.cached_tokens`) and
Sluice's own extension object (`sluice`). A new field gets a default; no field is ever renamed
or reused.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Struct, UnsetType


class ToolCallFunction(Struct, kw_only=True):
    name: str
    arguments: str  # JSON text of the arguments, as OpenAI sends it


class ToolCall(Struct, kw_only=True):
    """A tool call of an earlier assistant turn (input), or one parsed from the output (result)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int  # prompt tokens whose computation the prefix cache spared


class CompletionTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int  # output tokens of the reasoning a reasoning parser split off


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    # written only where a reasoning parser runs on the job (a chat job, `reasoning_parser` set)
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET


class SluiceExtension(Struct, kw_only=True, omit_defaults=True):
    """Sluice's extension of a response body (`body.sluice`): where the time went, and choice probabilities."""

    schema_version: int
    queue_ms: float  # from the job's Kafka timestamp to admission into the engine
    ttft_ms: float | None = None  # admission to first generated token
    total_ms: float  # from the job's Kafka timestamp to the result being ready
    engine: str = ""
    # a `choice` constraint's probability of each choice (the model's probability of the choice's
    # tokens and EOS after the prompt, renormalised over the choices); absent without one
    choice_probabilities: dict[str, float] | None = None


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob]


class AssistantMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # null when the turn is only tool calls
    tool_calls: list[ToolCall] | UnsetType = UNSET  # written only when the model called tools
    # the reasoning, apart from the answer (a reasoning parser's): vLLM's name and its newer one;
    # written only where a parser found some
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET


# "abort" is never written any more (an aborted request gets an error result); results from
# before still decode
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "abort"]


ChoiceT = TypeVar("ChoiceT")


class _CompletionBody(Struct, Generic[ChoiceT], kw_only=True):
    """What both endpoints' response bodies hold; they differ in the shape of a choice (and the tag)."""

    id: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: Usage
    # the serving configuration the answer came from (service/fingerprint.py); null in results
    # written before it existed
    system_fingerprint: str | None = None
    sluice: SluiceExtension | None = None


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it


class ChatCompletion(_CompletionBody[ChatChoice], kw_only=True, tag_field="object", tag="chat.completion"):
    """OpenAI's `chat.completion` object."""


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token of an echoed prompt
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(Struct, kw_only=True):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it


class TextCompletion(
    _CompletionBody[CompletionChoice], kw_only=True, tag_field="object", tag="text_completion"
):
    """OpenAI's `text_completion` object."""


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(Struct, kw_only=True):
    """The body OpenAI returns with a failed request's status code."""

    error: ErrorDetail
