"""Tool calling: `tools` rendered by the chat template, tool calls parsed from the output.

`tool_choice`:
- "none": the tools are rendered, nothing is parsed (the text is the answer);
- "auto" (the default with tools): the output is parsed by the model's tool call format
  (`tool_call_parser`); calls found become `message.tool_calls`, `finish_reason: "tool_calls"`;
- "required": the output is constrained by a JSON schema (vLLM's, with no keys besides these):
  a list of at least one `{"name": <a tool>, "parameters": <its schema>}`; each becomes a tool call (`"tool_calls"`);
- `{"type": "function", "function": {"name": F}}`: the output is constrained by F's parameter
  schema and is F's arguments; `finish_reason` stays `"stop"`, as OpenAI answers a forced call.
`parallel_tool_calls: false`: at most one call ("required" allows one item; "auto" keeps the first).

Formats (`tool_call_parser`): `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
text before the first call is the content) and `llama3_json` (the whole output is
`{"name": ..., "parameters": {...}}`, several separated by `;`, optionally after `<|python_tag|>`).
`harmony` (GPT-OSS): a message addressed to a function, `<|channel|>commentary
to=functions.NAME [<|constrain|>json]<|message|>{ARGUMENTS}<|call|>` (the recipient may also
come before `<|channel|>`), is a call; the other messages (the final answer, a preamble, the
reasoning when no reasoning parser took it) are the content. Other recipients (`browser.*`,
`python`: GPT-OSS's built-in tools) are not function calls and stay in the content.
`auto` picks harmony where the reasoning parser is harmony (a GPT-OSS checkpoint), else hermes
when the chat template mentions `<tool_call>`, else llama3_json.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from engine import StructuredOutputs
from schemas.openai import ChatCompletionRequest, NamedToolChoice
from schemas.responses import ToolCall, ToolCallFunction

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HARMONY_START, _HARMONY_MESSAGE = "<|start|>", "<|message|>"
_HARMONY_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
_HARMONY_END = re.compile(r"<\|(?:call|end|return)\|>")
# JSON the model wrote that is no call: json's nesting bound is the interpreter's recursion limit
_NOT_JSON = (ValueError, RecursionError)


class ToolError(ValueError):
    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def tool_mode(body: ChatCompletionRequest) -> str | None:
    """None (no tools), "none", "auto", "required", or "function:<name>". Raises ToolError."""
    choice = body.tool_choice
    if not body.tools:
        if choice in (None, "none"):
            return None
        raise ToolError("tool_choice needs tools")
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    name = _named(choice)
    if name not in {tool.function.name for tool in body.tools}:
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools")
    return f"function:{name}"


def tool_constraint(body, structured_outputs: StructuredOutputs | None) -> StructuredOutputs | None:
    """The job's output constraint: its own, or the tool schema of "required" or a named function."""
    if not isinstance(body, ChatCompletionRequest):
        return structured_outputs
    schema = tool_schema(body, tool_mode(body))
    if schema is None:
        return structured_outputs
    if structured_outputs is not None:
        raise ToolError(
            "a required or named tool_choice constrains the output; it takes no other structured output"
        )
    return StructuredOutputs(json=schema)


def tool_schema(body: ChatCompletionRequest, mode: str | None) -> dict[str, Any] | None:
    """The JSON schema that constrains the output of "required" or a named function, else None."""
    if mode == "required":
        items = {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": t.function.parameters or {"type": "object"},
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in body.tools
            ],
        }
        schema = {"type": "array", "minItems": 1, "items": items}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema
    if mode is not None and mode.startswith("function:"):
        tool = next(t for t in body.tools if t.function.name == mode.removeprefix("function:"))
        return tool.function.parameters or {"type": "object"}
    return None


def tool_calls_of(text: str, mode: str | None, parser: str, parallel: bool = True):
    """(content, tool calls) of one output; tool calls is empty where there are none."""
    if mode in (None, "none"):
        return text, []
    if mode.startswith("function:"):
        return None, [_call(mode.removeprefix("function:"), text)]
    if mode == "required":
        try:
            calls = [_call(item["name"], json.dumps(item["parameters"])) for item in json.loads(text)]
        except (*_NOT_JSON, TypeError, KeyError):
            return text, []  # cut short (max_tokens) before the list was complete
        return None, calls
    parse = {"hermes": _hermes, "harmony": _harmony}.get(parser, _llama3_json)
    content, calls = parse(text)
    return content, calls if parallel else calls[:1]


def parser_for(configured: str, chat_template: str | None, reasoning_parser: str = "none") -> str:
    if configured != "auto":
        return configured
    if reasoning_parser == "harmony":
        return "harmony"
    return "hermes" if chat_template and "<tool_call>" in chat_template else "llama3_json"


def _named(choice: NamedToolChoice) -> str:
    return choice.function.name


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(name=name, arguments=arguments)
    )


def _from_json(item: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get(arguments_key, item.get("arguments", {}))
    return _call(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    calls = []
    for raw in _HERMES_CALL.findall(text):
        try:
            call = _from_json(json.loads(raw), "arguments")
        except _NOT_JSON:
            call = None
        if call is None:
            return text, []  # a malformed call: the text stays the answer, as vLLM's parser does
        calls.append(call)
    if not calls:
        return text, []
    content = text[: text.index("<tool_call>")].strip()
    return content or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            item, end = decoder.raw_decode(body, position)
        except _NOT_JSON:
            return text, []
        call = _from_json(item, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        position = end
        while position < len(body) and body[position] in " \n\t;":
            position += 1
    return None, calls


def _harmony(text: str) -> tuple[str | None, list[ToolCall]]:
    calls, kept = [], []
    for i, chunk in enumerate(text.split(_HARMONY_START)):
        header, has_body, body = chunk.partition(_HARMONY_MESSAGE)
        recipient = _HARMONY_RECIPIENT.search(header) if has_body else None
        if recipient is None:  # not a function call: the content keeps it as generated
            kept.append(chunk if i == 0 else _HARMONY_START + chunk)
            continue
        arguments = _HARMONY_END.split(body, 1)[0].strip()
        try:
            json.loads(arguments)
        except _NOT_JSON:
            return text, []  # malformed or cut short: the text stays the answer
        calls.append(_call(recipient[1], arguments))
    if not calls:
        return text, []
    return "".join(kept).strip() or None, calls
