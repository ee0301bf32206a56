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
import re
from typing import Any

import msgspec

from schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest


class PromptError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def prompt_token_ids(
    body: ChatCompletionRequest | CompletionRequest, tokenizer, allow_special_tokens: bool = False
) -> list[int]:
    """Prompt text is the user's text: a control token it spells (`</s>`, `<|eot_id|>`) is
    tokenised as text unless `allow_special_tokens` (trusted producers)."""
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tokenizer.encode(
                body.prompt, add_special_tokens=add_special, split_special_tokens=not allow_special_tokens
            )
    else:
        ids = _chat_token_ids(body, tokenizer, allow_special_tokens)
    if body.truncate_prompt_tokens is not None:
        ids = ids[-body.truncate_prompt_tokens :]  # vLLM keeps the last k
    return ids


def render_chat(body: ChatCompletionRequest, tokenizer, messages: list[dict] | None = None) -> str:
    """The chat as its template renders it (`messages`: the body's messages as template dicts)."""
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
    if messages is None:
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


def _chat_token_ids(body: ChatCompletionRequest, tokenizer, allow_special: bool) -> list[int]:
    # The rendered template already holds the BOS token where the model wants one.
    add_special = bool(body.add_special_tokens)
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    rendered = render_chat(body, tokenizer, messages)
    if allow_special or not _spells_special_token([m["content"] for m in messages], tokenizer):
        return tokenizer.encode(rendered, add_special_tokens=add_special)
    return _encode_contents_as_text(body, rendered, messages, tokenizer, add_special)


def _spells_special_token(texts: list[str], tokenizer) -> bool:
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.update(tokenizer.all_special_tokens)
    return any(special in text for text in texts for special in specials if special)


def _encode_contents_as_text(
    body: ChatCompletionRequest, rendered: str, messages: list[dict], tokenizer, add_special: bool
) -> list[int]:
    """The rendered chat with the template's own text (and control tokens) as the template wrote
    it, and each message's content with its special-token spellings as plain text.

    A rendering with a marker for each content says which parts of `rendered` are the template's;
    the parts between them must be the contents (verbatim, or trimmed as some templates do)."""
    marked_messages = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    marked = render_chat(body, tokenizer, marked_messages)
    parts = re.split("\ue000([0-9]+)\ue001", marked)  # template text, content index, template text, ...
    if not rendered.startswith(parts[0]):
        raise _template_changes_content()
    ids = tokenizer.encode(parts[0], add_special_tokens=add_special)
    pos = len(parts[0])
    # looked up by the marker's text: a name or tool field may spell a marker of no message's
    contents = {str(i): m["content"] for i, m in enumerate(messages)}
    for index, template_text in zip(parts[1::2], parts[2::2], strict=True):
        if index not in contents:
            raise PromptError(
                "invalid_request",
                "a message field spells U+E000 digits U+E001, the marker of a content; remove it",
            )
        content = contents[index]
        text = next(
            (t for t in (content, content.strip()) if rendered.startswith(t + template_text, pos)), None
        )
        if text is None:
            raise _template_changes_content()
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        ids += tokenizer.encode(template_text, add_special_tokens=False)
        pos += len(text) + len(template_text)
    if pos != len(rendered):
        raise _template_changes_content()
    return ids


def _template_changes_content() -> PromptError:
    return PromptError(
        "invalid_request",
        "the chat template changes a message's text, so its special-token spellings cannot be kept as "
        "text; remove them, or ask the operator for allow_special_tokens",
    )


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
    except RecursionError:  # json's nesting bound is the interpreter's recursion limit (~1000)
        raise PromptError(
            "invalid_request", f"{param}.function.arguments is nested too deeply", param
        ) from None


def _template_arg_names() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase

    names = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    return frozenset(names - {"self", "kwargs"} | {"messages", "bos_token", "eos_token"})


_RESERVED_TEMPLATE_ARGS = _template_arg_names()
