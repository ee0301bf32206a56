"""A job's prompt as token ids: a completion's text or ids, or a chat rendered by its template.

The chat fields are vLLM's: `add_generation_prompt`, `continue_final_message` (the last message
left open, to be continued: an assistant prefill), `chat_template`, `chat_template_kwargs`
(e.g. Qwen3's `enable_thinking`), `documents`, `add_special_tokens`; messages keep their
`name`, an assistant's `tool_calls` (arguments as objects, as templates expect) and a tool
message's `tool_call_id`.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import msgspec

from schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest


class PromptError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def prompt_token_ids(body: ChatCompletionRequest | CompletionRequest, tokenizer) -> list[int]:
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tokenizer.encode(body.prompt, add_special_tokens=add_special)
    else:
        # The rendered template already holds the BOS token where the model wants one.
        ids = tokenizer.encode(render_chat(body, tokenizer), add_special_tokens=bool(body.add_special_tokens))
    if body.truncate_prompt_tokens is not None:
        ids = ids[-body.truncate_prompt_tokens :]  # vLLM keeps the last k
    return ids


def render_chat(body: ChatCompletionRequest, tokenizer) -> str:
    if not (body.chat_template or tokenizer.chat_template):
        raise PromptError("unsupported_endpoint", "this model has no chat template; use /v1/completions")
    if body.add_generation_prompt and body.continue_final_message:
        raise PromptError(
            "invalid_request",
            "continue_final_message continues the last message; it takes add_generation_prompt: false",
            "continue_final_message",
        )
    kwargs = dict(body.chat_template_kwargs or {})
    if clash := sorted(set(kwargs) & _RESERVED_TEMPLATE_ARGS):
        raise PromptError(
            "invalid_request",
            f"chat_template_kwargs may not set {clash[0]!r}: it is a request field or the renderer's own",
            "chat_template_kwargs",
        )
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    try:
        return tokenizer.apply_chat_template(
            messages,
            documents=body.documents,
            tools=[msgspec.to_builtins(tool) for tool in body.tools] if body.tools else None,
            chat_template=body.chat_template,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
            **kwargs,
        )
    except Exception as e:  # a template may reject a role order; its message says which
        raise PromptError("invalid_request", f"the chat template rejected the messages: {e}") from None


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.text}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments(call.function.arguments, f"messages[{index}].tool_calls[{j}]"),
                },
            }
            for j, call in enumerate(message.tool_calls)
        ]
    return out


def _arguments(text: str, param: str) -> Any:
    # templates render a call's arguments as an object (vLLM parses them the same way)
    try:
        return json.loads(text)
    except ValueError as e:
        raise PromptError("invalid_request", f"{param}.function.arguments is not JSON: {e}", param) from None


def _template_arg_names() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase

    names = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    return frozenset(names - {"self", "kwargs"} | {"messages", "bos_token", "eos_token"})


_RESERVED_TEMPLATE_ARGS = _template_arg_names()
