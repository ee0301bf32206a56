"""A Responses job's answer: the chat result it ran as, written as OpenAI's Response object.

Output items in order: a `reasoning` item (the reasoning a reasoning parser split off), a
`message` item (the content, with its logprobs under `include`), a `function_call` item per call;
Responses' usage; the request's settings echoed as OpenAI echoes them (service/responses_api.py
translates the request).
"""

from __future__ import annotations

import uuid

from msgspec import UnsetType

from schemas.batch import BatchRequestLine, BatchResponse, BatchResponseLine
from schemas.responses import ChatChoice, ChatCompletion
from schemas.responses_api import (
    FormatEcho,
    FunctionCallItem,
    FunctionChoiceEcho,
    FunctionToolEcho,
    IncompleteDetails,
    InputTokensDetails,
    Logprob,
    LogprobAlternative,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningEcho,
    ReasoningItem,
    ReasoningText,
    ResponseBody,
    ResponsesRequest,
    ResponseUsage,
    TextEcho,
)


def to_response_line(job: BatchRequestLine, chat_line: BatchResponseLine) -> BatchResponseLine:
    """The chat result of `job` (a Responses job) written as a Response; an error result as it is."""
    response = chat_line.response
    if response is None or not isinstance(response.body, ChatCompletion):
        return chat_line
    body = response_body(job.body, response.body)
    return BatchResponseLine(
        id=chat_line.id,
        custom_id=chat_line.custom_id,
        response=BatchResponse(status_code=response.status_code, request_id=response.request_id, body=body),
    )


def response_body(request: ResponsesRequest, chat: ChatCompletion) -> ResponseBody:
    choice = chat.choices[0]  # a Responses job has one sample
    is_cut = choice.finish_reason == "length"
    usage = chat.usage
    reasoning_tokens = usage.completion_tokens_details
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseBody(
        id=f"resp_{uuid.uuid4().hex}",
        created_at=chat.created,
        status="incomplete" if is_cut else "completed",
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if is_cut else None,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        model=chat.model,
        output=_output_items(choice, is_cut),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        reasoning=ReasoningEcho(effort=request.reasoning.effort if request.reasoning else None),
        temperature=1.0 if request.temperature is None else request.temperature,
        text=_text_echo(request),
        tool_choice=_tool_choice_echo(request),
        tools=[
            FunctionToolEcho(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)
            for t in request.tools or ()
        ],
        top_logprobs=request.top_logprobs or 0,
        top_p=1.0 if request.top_p is None else request.top_p,
        usage=ResponseUsage(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=cached, cache_write_tokens=usage.prompt_tokens - cached
            ),
            output_tokens=usage.completion_tokens,
            output_tokens_details=OutputTokensDetails(
                reasoning_tokens=0
                if isinstance(reasoning_tokens, UnsetType)
                else reasoning_tokens.reasoning_tokens
            ),
            total_tokens=usage.total_tokens,
        ),
        user=request.user,
        metadata=dict(request.metadata or {}),
        sluice=chat.sluice,
    )


def _output_items(choice: ChatChoice, is_cut: bool) -> list:
    message = choice.message
    status = "incomplete" if is_cut else "completed"
    items = []
    if isinstance(message.reasoning_content, str):
        # cut while reasoning: no content yet, the reasoning is what was cut
        reasoning_status = status if message.content is None and not message.tool_calls else "completed"
        items.append(
            ReasoningItem(
                id=f"rs_{uuid.uuid4().hex}",
                content=[ReasoningText(text=message.reasoning_content)],
                status=reasoning_status,
            )
        )
    if message.content is not None:
        logprobs = [] if choice.logprobs is None else [_logprob(lp) for lp in choice.logprobs.content]
        text = OutputText(text=message.content, logprobs=logprobs)
        items.append(OutputMessage(id=f"msg_{uuid.uuid4().hex}", status=status, content=[text]))
    for call in message.tool_calls or ():
        items.append(
            FunctionCallItem(
                id=f"fc_{uuid.uuid4().hex}",
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
        )
    return items


def _logprob(lp) -> Logprob:
    return Logprob(
        token=lp.token,
        bytes=_bytes(lp),
        logprob=lp.logprob,
        top_logprobs=[
            LogprobAlternative(token=t.token, bytes=_bytes(t), logprob=t.logprob) for t in lp.top_logprobs
        ],
    )


def _bytes(lp) -> list[int]:
    return list(lp.token.encode()) if lp.bytes is None else lp.bytes


def _text_echo(request: ResponsesRequest) -> TextEcho:
    fmt = request.text.format if request.text is not None else None
    if fmt is None:
        return TextEcho()
    return TextEcho(
        format=FormatEcho(
            type=fmt.type, name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict
        )
    )


def _tool_choice_echo(request: ResponsesRequest):
    choice = request.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else FunctionChoiceEcho(name=choice.name)
