"""OpenAI's `/v1/responses`: the request body and the Response object, as its API reference has them.

Every field of OpenAI's request schema is declared, so that each one is either honoured or
refused by name (service/fields.py holds the table); a field typed `Any` is read only to be
refused (or, for metadata, accepted without effect). As with the other endpoints, an unknown
field is found by schemas/fields.py, not by msgspec (which ignores it), so that the service's
`unknown_fields` decides. The service runs a Responses job as a chat job
(service/responses_api.py); these types are only the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from schemas.openai import Priority, Temperature, UnixTimeMs
from schemas.responses import SluiceExtension


class InputContentPart(Struct, kw_only=True, omit_defaults=True):
    """One part of an input message's content: `input_text` (user, system, developer) or
    `output_text` (an earlier assistant turn); a part of another kind (`input_image`,
    `input_file`, ...) is refused by its path, its fields unread."""

    known_types: ClassVar[tuple[str, ...]] = ("input_text", "output_text")

    type: str
    text: str | None = None
    annotations: Any = None  # an earlier output_text's: no effect on the prompt
    logprobs: Any = None  # an earlier output_text's: no effect on the prompt


class InputItem(Struct, kw_only=True, omit_defaults=True):
    """One item of `input`: a message (`type` "message", or no type), an earlier `function_call`
    of the model, or a `function_call_output` answering one. An item of another type (`reasoning`,
    `item_reference`, a built-in tool's call) is refused by its path, its fields unread."""

    known_types: ClassVar[tuple[str, ...]] = ("message", "function_call", "function_call_output")
    default_type: ClassVar[str] = "message"

    type: str = "message"
    # a message
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputContentPart] | None = None
    # a function_call (call_id, name, arguments) or a function_call_output (call_id, output)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContentPart] | None = None
    # an earlier output item's own id and status, and an assistant message's phase: no effect
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @property
    def text(self) -> str:
        """A message's text: its text parts joined with newlines, as a chat message's are."""
        return _joined(self.content)

    @property
    def output_text(self) -> str:
        return _joined(self.output)


class ResponseFormatText(Struct, kw_only=True, omit_defaults=True):
    """`text.format`: `text`, `json_object`, or `json_schema` (flat: name, schema, strict)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    format: ResponseFormatText | None = None
    verbosity: Any = None


class ReasoningConfig(Struct, kw_only=True, omit_defaults=True):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    # read so that they are refused by name
    summary: Any = None
    generate_summary: Any = None
    mode: Any = None
    context: Any = None


class FunctionTool(Struct, kw_only=True, omit_defaults=True):
    """A tool, in Responses' flat shape; only `function` tools run here (built-in tools are refused
    by their path, their fields unread)."""

    known_types: ClassVar[tuple[str, ...]] = ("function",)

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(Struct, kw_only=True, omit_defaults=True):
    """`tool_choice` naming one function: {"type": "function", "name": ...}; other types are refused."""

    known_types: ClassVar[tuple[str, ...]] = ("function",)

    type: str
    name: str | None = None


class ResponsesRequest(Struct, kw_only=True, omit_defaults=True):
    """The body of a `/v1/responses` job."""

    input: str | Annotated[list[InputItem], Meta(min_length=1)]
    model: str = ""
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    include: list[str] | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    seed: int | None = None
    # no effect on the answer
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    service_tier: Any = None
    # what needs state or services Sluice does not have: read so that they are refused by name
    store: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    background_options: Any = None
    prompt: Any = None
    stream: Any = None
    stream_options: Any = None
    truncation: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    prompt_cache_options: Any = None
    # vLLM's and Sluice's, as for the other endpoints
    priority: Priority = 0
    sluice_deadline_ms: UnixTimeMs | None = None


# the Response object


class IncompleteDetails(Struct, kw_only=True):
    reason: Literal["max_output_tokens", "content_filter"]


class LogprobAlternative(Struct, kw_only=True):
    token: str
    bytes: list[int]
    logprob: float


class Logprob(Struct, kw_only=True):
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[LogprobAlternative]


class OutputText(Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = field(default_factory=list)  # none: no citations without search tools
    logprobs: list[Logprob] = field(default_factory=list)  # with include message.output_text.logprobs


class OutputMessage(Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["completed", "incomplete"]
    content: list[OutputText]


class ReasoningText(Struct, kw_only=True, tag_field="type", tag="reasoning_text"):
    text: str


class ReasoningItem(Struct, kw_only=True, tag_field="type", tag="reasoning"):
    """The reasoning a reasoning parser split off the answer (the model's own text, not a summary)."""

    id: str
    summary: list[Any] = field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["completed", "incomplete"] = "completed"


class FunctionCallItem(Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    status: Literal["completed", "incomplete"] = "completed"


OutputItem = ReasoningItem | OutputMessage | FunctionCallItem


class InputTokensDetails(Struct, kw_only=True):
    cached_tokens: int  # prompt tokens the prefix cache spared
    # prompt tokens this job computed (not read from the prefix cache): the KV it may keep for others
    cache_write_tokens: int


class OutputTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int


class ResponseUsage(Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class FunctionToolEcho(Struct, kw_only=True, tag_field="type", tag="function"):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoiceEcho(Struct, kw_only=True, tag_field="type", tag="function"):
    name: str


class FormatEcho(Struct, kw_only=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextEcho(Struct, kw_only=True):
    format: FormatEcho = field(default_factory=lambda: FormatEcho(type="text"))
    verbosity: Literal["low", "medium", "high"] = "medium"


class ReasoningEcho(Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class ResponseBody(Struct, kw_only=True, tag_field="object", tag="response"):
    """OpenAI's Response object (`object: "response"`), with the request's settings echoed as
    OpenAI echoes them, and Sluice's extension object."""

    id: str  # resp_...
    created_at: int
    status: Literal["completed", "incomplete"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: ReasoningEcho = field(default_factory=ReasoningEcho)
    background: bool = False
    service_tier: str = "default"
    temperature: float = 1.0
    text: TextEcho = field(default_factory=TextEcho)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoiceEcho = "auto"
    tools: list[FunctionToolEcho] = field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage
    user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sluice: SluiceExtension | UnsetType = UNSET


def _joined(content: str | list[InputContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text or "" for part in content if part.type in ("input_text", "output_text"))
