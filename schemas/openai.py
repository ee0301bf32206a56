"""OpenAI request bodies, with vLLM's extra sampling fields where vLLM has one.

Field names and meanings follow OpenAI's `/v1/chat/completions` and `/v1/completions`, so
existing batch files decode unchanged. Unknown fields are ignored here (msgspec's default), so
an old consumer still reads a newer producer's jobs; whether the service then refuses them is
its policy (service/fields.py, `unknown_fields`). A new field gets a default; no field is ever
renamed or reused. The response bodies are in schemas/responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

# ToolCall is both: an earlier assistant turn's call here, a parsed call in a result
from schemas.responses import ToolCall

NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# the engine's priority levels (engine/core/input_processor.py MAX_PRIORITY): bounded, so that aging bounds every wait
Priority = Annotated[int, Meta(ge=-1000, le=1000)]
# past any real date and still exact as a float (a larger int overflows the seconds it becomes);
# the sluice-deadline-ms header's bound too (service/headers.py)
UnixTimeMs = Annotated[int, Meta(ge=0, lt=2**53)]
# parallel samples of one job: OpenAI's bound on `n`, so that one job cannot ask for a million
NumSamples = Annotated[int, Meta(ge=1, le=128)]


class ContentPart(Struct, kw_only=True, omit_defaults=True):
    """One part of a message's content; only text parts carry anything a text model reads."""

    type: str
    text: str | None = None
    # the other kinds' payloads: read so that a part of such a kind is refused by name
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # read so that they are refused by name, never dropped
    refusal: Any = None
    audio: Any = None
    function_call: Any = None
    reasoning_content: Any = None

    @property
    def text(self) -> str:
        """The text of the content: its text parts joined with newlines (vLLM's joining)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content if part.type == "text")


class JsonSchemaFormat(Struct, kw_only=True, omit_defaults=True):
    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True, omit_defaults=True):
    """OpenAI's output format: `json_schema` constrains the output to the schema, `json_object` to any object."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"] = "text"
    json_schema: JsonSchemaFormat | None = None
    # vLLM's structural_tag format (refused): read so that it is refused, not dropped
    structures: Any = None
    triggers: Any = None


class StructuredOutputsRequest(Struct, kw_only=True, omit_defaults=True):
    """vLLM's `structured_outputs` request field: at most one constraint on the output."""

    choice: list[str] | None = None  # the output is exactly one of these strings
    regex: str | None = None  # the output fully matches this regular expression
    json: dict[str, Any] | str | None = None  # a JSON schema (or its JSON text) the output validates against
    json_object: bool | None = None  # any JSON object
    # vLLM constraints and options Sluice does not implement: read so that they are refused, not dropped
    grammar: str | None = None
    structural_tag: Any = None
    disable_any_whitespace: Any = None
    disable_fallback: Any = None
    disable_additional_properties: Any = None
    whitespace_pattern: Any = None


class FunctionDefinition(Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, kw_only=True, omit_defaults=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(Struct, kw_only=True, omit_defaults=True):
    name: str


class NamedToolChoice(Struct, kw_only=True, omit_defaults=True):
    """`tool_choice` naming one function: {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"]
    function: ToolChoiceFunction


class _SamplingFields(Struct, kw_only=True, omit_defaults=True):
    """Fields shared by both endpoints. `None` means "the default of the serving side".

    Every field of OpenAI's and vLLM's request schemas is declared, so that each one is either
    honoured or refused by name (service/fields.py holds the table); a field typed `Any` is read
    only to be refused (or, for metadata, accepted without effect).
    """

    model: str = ""
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    n: NumSamples = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    response_format: ResponseFormat | None = None
    echo: bool = False
    stream: bool | None = None
    stream_options: Any = None
    # OpenAI's metadata: no effect on the answer
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    # vLLM's extra sampling fields
    best_of: NumSamples | None = None
    use_beam_search: Any = None
    length_penalty: Any = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_choice: list[str] | None = None  # vLLM's older names for structured_outputs' fields
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_grammar: Any = None
    structural_tag: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: PositiveInt | None = None
    add_special_tokens: bool | None = (
        None  # default: False for chat (the template has them), True for completions
    )
    return_tokens_as_token_ids: bool | None = None
    priority: Priority = 0
    stop_token_ids: list[NonNegativeInt] | None = None
    request_id: Any = None  # vLLM's own request id: no effect (Sluice names requests itself)
    prompt_logprobs: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    return_token_ids: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    # vLLM's repetitive-pattern stop (newer vLLM): read so that it is refused, not dropped
    max_repetition_pattern_size: Any = None
    min_repetition_pattern_size: Any = None
    repetition_min_count: Any = None
    # Sluice's extension: Unix time in milliseconds after which the job is not worth running
    sluice_deadline_ms: UnixTimeMs | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields, kw_only=True, omit_defaults=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat template fields
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    # read so that they are refused by name
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    include_reasoning: Any = None
    mm_processor_kwargs: Any = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields, kw_only=True, omit_defaults=True):
    prompt: str | Annotated[list[NonNegativeInt], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    suffix: Any = None
    prompt_embeds: Any = None

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        return self.logprobs
