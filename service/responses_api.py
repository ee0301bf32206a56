"""`/v1/responses` jobs: run as chat jobs, answered as OpenAI's Response object
(service/responses_output.py writes it).

A Responses request is translated into the chat request it means (instructions and input items
as messages, flat function tools as chat tools, `text.format` as `response_format`,
`max_output_tokens` as `max_completion_tokens`, `reasoning.effort` as the chat template's own
variable), so that it takes the chat path's prompts, sampling, structured outputs, tool-call and
reasoning parsers and logprobs unchanged; the chat result is then written as a Response
(reasoning, message and function_call output items, Responses' usage, the request's settings
echoed). What needs state or services Sluice does not have is refused by name (service/fields.py).
"""

from __future__ import annotations

from schemas.batch import CHAT_URL, BatchRequestLine
from schemas.openai import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolChoiceFunction,
)
from schemas.responses import ToolCall, ToolCallFunction
from schemas.responses_api import InputItem, ResponsesRequest
from service.fields import TranslationError, UnsupportedParameter, rules_for

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# what each kind of chat template calls its reasoning switch, and the efforts it takes
_HARMONY_EFFORTS = ("low", "medium", "high")
_NO_THINKING = ("none", "minimal")


def to_chat_job(job: BatchRequestLine, chat_template: str | None) -> BatchRequestLine:
    """The chat job a Responses job means. Refuses, by name, any field it cannot honour.

    `chat_template`: the model's, which says whether (and how) it takes a reasoning effort."""
    body = job.body
    _check_policy(body)
    logprobs = _logprobs(body)
    chat = ChatCompletionRequest(
        model=body.model,
        messages=_messages(body),
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        logprobs=logprobs,
        top_logprobs=body.top_logprobs if logprobs else None,
        response_format=_response_format(body),
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
        chat_template_kwargs=_reasoning_kwargs(body, chat_template),
        priority=body.priority,
        sluice_deadline_ms=body.sluice_deadline_ms,
    )
    return BatchRequestLine(custom_id=job.custom_id, url=CHAT_URL, body=chat)


def responses_param(param: str | None) -> str | None:
    """A chat request field an error names (from the chat path a Responses job runs on) as the
    Responses field the job set: `logprobs` -> `top_logprobs`, `response_format...` -> `text.format`,
    `messages[i]...` -> `input`, `tools[i].function.strict` -> `tools[i].strict`."""
    if param is None:
        return None
    if param in ("logprobs", "top_logprobs"):
        return "top_logprobs"
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith("response_format"):
        return "text.format"
    if param.startswith("messages"):
        return "input"  # instructions and merged calls shift the indexes: the field, not the item
    if param == "chat_template_kwargs":
        return "reasoning.effort"
    return param.replace(".function.", ".")


# --- request -> chat request --------------------------------------------------------------------


def _check_policy(body: ResponsesRequest) -> None:
    """The policy table's refusals, then the refused parts of honoured fields, each by its path."""
    for rule in rules_for(ResponsesRequest):
        if rule.refuses(value := getattr(body, rule.name)):
            why = f": {rule.note}" if rule.note else ""
            raise UnsupportedParameter(rule.name, f"`{rule.name}` = {value!r} is not supported{why}")
    for value in body.include or ():
        if value != LOGPROBS_INCLUDE:
            raise UnsupportedParameter(
                "include", f"include {value!r} is not supported; only {LOGPROBS_INCLUDE!r}"
            )
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise UnsupportedParameter("text.verbosity", "text.verbosity is not supported; only 'medium'")
    if (reasoning := body.reasoning) is not None:
        for name in ("summary", "generate_summary", "mode", "context"):
            if getattr(reasoning, name) is not None:
                raise UnsupportedParameter(
                    f"reasoning.{name}",
                    f"reasoning.{name} is not supported: the reasoning comes back as the model wrote it",
                )
    for i, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise UnsupportedParameter(
                f"tools[{i}]", f"tools[{i}] is a `{tool.type}` tool; only function tools run here"
            )
        if tool.name is None:
            raise TranslationError("invalid_request", f"tools[{i}] has no name", param=f"tools[{i}].name")
        if tool.strict and body.tool_choice in (None, "auto", "none"):
            raise UnsupportedParameter(
                f"tools[{i}].strict",
                f"tools[{i}].strict = true is not supported with tool_choice {body.tool_choice or 'auto'!r}: "
                'the arguments are not constrained there; use tool_choice "required" or a named function',
            )
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        if choice.type != "function":
            raise UnsupportedParameter(
                "tool_choice", f"tool_choice of type `{choice.type}` is not supported; only a named function"
            )
        if not choice.name:
            raise TranslationError(
                "invalid_request", "tool_choice of type `function` needs a `name`", param="tool_choice.name"
            )


def _messages(body: ResponsesRequest) -> list[ChatMessage]:
    messages = [] if body.instructions is None else [ChatMessage(role="system", content=body.instructions)]
    if isinstance(body.input, str):
        return [*messages, ChatMessage(role="user", content=body.input)]
    for i, item in enumerate(body.input):
        if item.type == "message":
            messages.append(_message(item, i))
        elif item.type == "function_call":
            call = ToolCall(
                id=_required(item, i, "call_id"),
                function=ToolCallFunction(
                    name=_required(item, i, "name"), arguments=_required(item, i, "arguments")
                ),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)  # parallel calls of one turn: one assistant message
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type == "function_call_output":
            _check_parts(item.output, f"input[{i}].output")
            messages.append(
                ChatMessage(role="tool", content=item.output_text, tool_call_id=_required(item, i, "call_id"))
            )
        else:
            raise UnsupportedParameter(
                f"input[{i}]",
                f"input[{i}] is a `{item.type}` item; only message, function_call and function_call_output "
                "items are read here",
            )
    return messages


def _message(item: InputItem, i: int) -> ChatMessage:
    if item.role is None:
        raise TranslationError(
            "invalid_request", f"input[{i}] is a message without a role", param=f"input[{i}].role"
        )
    _check_parts(item.content, f"input[{i}].content")
    return ChatMessage(role=item.role, content=item.text)


def _check_parts(content, path: str) -> None:
    for j, part in enumerate(content if isinstance(content, list) else ()):
        if part.type not in ("input_text", "output_text"):
            raise UnsupportedParameter(
                f"{path}[{j}]", f"{path}[{j}] is a `{part.type}` part; this model reads text parts only"
            )


def _required(item: InputItem, i: int, name: str) -> str:
    value = getattr(item, name)
    if value is None:
        raise TranslationError(
            "invalid_request", f"input[{i}], a {item.type} item, needs `{name}`", param=f"input[{i}].{name}"
        )
    return value


def _logprobs(body: ResponsesRequest) -> bool:
    wanted = LOGPROBS_INCLUDE in (body.include or ())
    if body.top_logprobs and not wanted:
        raise TranslationError(
            "invalid_request",
            f"top_logprobs needs include: [{LOGPROBS_INCLUDE!r}] (without it no logprobs are returned)",
            param="top_logprobs",
        )
    return wanted


def _response_format(body: ResponsesRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema is None:
        raise TranslationError(
            "invalid_request", "text.format json_schema needs a `schema`", param="text.format.schema"
        )
    return ResponseFormat(
        type="json_schema",
        json_schema=JsonSchemaFormat(
            name=fmt.name or "response", description=fmt.description, schema=fmt.schema, strict=fmt.strict
        ),
    )


def _tools(body: ResponsesRequest) -> list[Tool] | None:
    if not body.tools:
        return None
    return [
        Tool(
            function=FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            )
        )
        for t in body.tools
    ]


def _tool_choice(body: ResponsesRequest):
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return NamedToolChoice(type="function", function=ToolChoiceFunction(name=choice.name))


def _reasoning_kwargs(body: ResponsesRequest, chat_template: str | None) -> dict | None:
    """`reasoning.effort` as the variable the model's chat template reads: GPT-OSS's
    `reasoning_effort` (low, medium, high), Qwen3's `enable_thinking` (off for none and minimal).
    A template that reads neither takes no effort: refused rather than ignored."""
    effort = body.reasoning.effort if body.reasoning is not None else None
    if effort is None:
        return None
    template = chat_template or ""
    if "reasoning_effort" in template:
        if effort not in _HARMONY_EFFORTS:
            raise UnsupportedParameter(
                "reasoning.effort",
                f"reasoning.effort {effort!r} is not supported by this model; only low, medium, high",
            )
        return {"reasoning_effort": effort}
    if "enable_thinking" in template:
        return {"enable_thinking": effort not in _NO_THINKING}
    raise UnsupportedParameter(
        "reasoning.effort",
        "reasoning.effort is not supported: this model's chat template takes no reasoning effort",
    )
