"""OpenAI request and response bodies, with vLLM's extra sampling fields where vLLM has one.

Field names and meanings follow OpenAI's `/v1/chat/completions` and `/v1/completions`, so
existing batch files decode unchanged. Unknown fields are ignored (msgspec's default), so an
old consumer still reads a newer producer's jobs. A new field gets a default; no field is
ever renamed or reused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class ContentPart(Struct, kw_only=True):
    """One part of a message's content; only text parts carry anything a text model reads."""

    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class JsonSchemaFormat(Struct, kw_only=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    """OpenAI's output format: `json_schema` constrains the output to the schema, `json_object` to any object."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(Struct, kw_only=True):
    """vLLM's `structured_outputs` request field: at most one constraint on the output."""

    choice: list[str] | None = None  # the output is exactly one of these strings
    regex: str | None = None  # the output fully matches this regular expression
    json: dict[str, Any] | str | None = None  # a JSON schema (or its JSON text) the output validates against
    json_object: bool | None = None  # any JSON object
    # vLLM constraints Sluice does not implement: read so that they are refused, not dropped
    grammar: str | None = None
    structural_tag: Any = None


class _SamplingFields(Struct, kw_only=True):
    """Fields shared by both endpoints. `None` means "the default of the serving side"."""

    model: str = ""
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    n: Literal[1] = 1  # one completion per job: a job is one line, its result one line
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling fields
    structured_outputs: StructuredOutputsRequest | None = None
    guided_choice: list[str] | None = None  # vLLM's older names for structured_outputs' fields
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    priority: int = 0
    stop_token_ids: list[NonNegativeInt] | None = None
    # Sluice's extension: Unix time in milliseconds after which the job is not worth running
    sluice_deadline_ms: NonNegativeInt | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | Annotated[list[NonNegativeInt], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        return self.logprobs


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    content: str | None = None


FinishReason = Literal["stop", "length", "abort"]


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Struct, kw_only=True, tag_field="object", tag="chat.completion"):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sluice: SluiceExtension | None = None


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(Struct, kw_only=True):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(Struct, kw_only=True, tag_field="object", tag="text_completion"):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sluice: SluiceExtension | None = None


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(Struct, kw_only=True):
    """The body OpenAI returns with a failed request's status code."""

    error: ErrorDetail
