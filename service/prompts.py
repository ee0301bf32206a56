"""A job's prompt as token ids: a completion's text or ids, or a chat rendered by its template.

The chat fields are vLLM's: `add_generation_prompt`, `continue_final_message` (the last message
left open, to be continued: an assistant prefill), `chat_template`, `chat_template_kwargs`
(e.g. Qwen3's `enable_thinking`), `documents`, `add_special_tokens`; messages keep their
`name`, an assistant's `tool_calls` (arguments as objects, as templates expect) and a tool
message's `tool_call_id`.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import msgspec
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, encode_marked_chat, mark_control_tokens

from schemas.openai import ChatCompletionRequest, ChatMessage, CompletionRequest


class PromptError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def prompt_token_ids(
    body: ChatCompletionRequest | CompletionRequest,
    tokenizer,
    allow_special_tokens: bool = False,
    rendered_chat: str | None = None,
) -> list[int]:
    """Prompt text is the user's text: a control token it spells (`</s>`, `<|eot_id|>`) is
    tokenised as text unless `allow_special_tokens` (trusted producers). In a chat, that holds
    for every string of the job the template renders, not only the messages' contents.

    `rendered_chat`: the chat as the job's own template rendered `chat_inputs` (in the template
    sandbox, service/template_sandbox.py); None renders it here."""
    if isinstance(body, CompletionRequest):
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
        else:
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tokenizer.encode(
                body.prompt, add_special_tokens=add_special, split_special_tokens=not allow_special_tokens
            )
    else:
        chat = chat_inputs(body, tokenizer, allow_special_tokens)
        rendered = render_chat(chat, tokenizer) if rendered_chat is None else rendered_chat
        # The rendered template already holds the BOS token where the model wants one.
        ids = encode_chat(rendered, chat, tokenizer, bool(body.add_special_tokens))
    if body.truncate_prompt_tokens is not None:
        ids = ids[-body.truncate_prompt_tokens :]  # vLLM keeps the last k
    return ids


@dataclass(slots=True)
class ChatInputs:
    """What a chat template is given for one job: template variables of plain JSON types only."""

    template: str | None  # the job's own template; None: the tokenizer's
    messages: list[dict[str, Any]]
    tools: list[Any] | None
    documents: list[Any] | None
    variables: dict[str, Any]  # chat_template_kwargs
    add_generation_prompt: bool
    continue_final_message: bool
    # the control tokens its strings spell are marked (transformers' mark_control_tokens) and a
    # string that could join another into one ends or starts with a marker: encode_chat reads them as text
    is_marked: bool = False

    def template_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of transformers' apply_chat_template / render_jinja_template."""
        return dict(
            tools=self.tools,
            documents=self.documents,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            **self.variables,
        )


def chat_inputs(body: ChatCompletionRequest, tokenizer, allow_special_tokens: bool = False) -> ChatInputs:
    """The job's chat as template variables; PromptError for a chat no template can render.

    Unless `allow_special_tokens`, every string the template may render (contents, names, tool
    call ids and arguments, tools at any depth, documents, chat_template_kwargs values; dict keys
    too) has the control tokens it spells marked, as transformers' `sanitize_control_tokens` does."""
    if not (body.chat_template or tokenizer.chat_template):
        raise PromptError("unsupported_endpoint", "this model has no chat template; use /v1/completions")
    if body.add_generation_prompt and body.continue_final_message:
        raise PromptError(
            "invalid_request",
            "continue_final_message continues the last message; it takes add_generation_prompt: false",
            "continue_final_message",
        )
    variables = dict(body.chat_template_kwargs or {})
    if clash := sorted(set(variables) & _RESERVED_TEMPLATE_ARGS):
        raise PromptError(
            "invalid_request",
            f"chat_template_kwargs may not set {clash[0]!r}: it is a request field or the renderer's own",
            "chat_template_kwargs",
        )
    chat = ChatInputs(
        template=body.chat_template,
        messages=[_message(m, i) for i, m in enumerate(body.messages)],
        tools=[msgspec.to_builtins(tool) for tool in body.tools] if body.tools else None,
        documents=body.documents,
        variables=variables,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    if not allow_special_tokens:
        try:
            _mark_user_strings(chat, tokenizer)
        except RecursionError:  # arguments JSON may nest to the interpreter's limit
            raise PromptError(
                "invalid_request",
                "the job's tool calls, tools, documents or chat_template_kwargs nest too deeply",
            ) from None
    return chat


def render_chat(chat: ChatInputs, tokenizer) -> str:
    """The chat as its template renders it, here (the job's own template: only for trusted callers;
    the service renders those in its template sandbox)."""
    try:
        return tokenizer.apply_chat_template(
            chat.messages, chat_template=chat.template, tokenize=False, **chat.template_kwargs()
        )
    except Exception as e:  # a template may reject a role order; its message says which
        raise PromptError("invalid_request", f"the chat template rejected the messages: {e}") from None


def encode_chat(rendered: str, chat: ChatInputs, tokenizer, add_special_tokens: bool) -> list[int]:
    """The rendered chat's token ids: the template's own control tokens as control tokens, the
    marked strings' ones as text."""
    if not chat.is_marked:
        return tokenizer.encode(rendered, add_special_tokens=add_special_tokens)
    try:
        ids = encode_marked_chat(tokenizer, rendered)
    except ValueError as e:  # a control token the tokenizer also makes of plain text
        raise PromptError("invalid_request", f"the prompt cannot keep a control token as text: {e}") from None
    if add_special_tokens:
        before, after = _special_tokens_frame(tokenizer)
        ids = before + ids + after
    return ids


def _mark_user_strings(chat: ChatInputs, tokenizer) -> None:
    tables = _ControlTokens.of(tokenizer).for_template(chat.template or tokenizer.chat_template)
    if tables is None:
        return
    marker = _Marker(tables)
    chat.messages = [{k: v if k == "role" else marker.mark(v) for k, v in m.items()} for m in chat.messages]
    chat.tools = marker.mark(chat.tools)
    chat.documents = marker.mark(chat.documents)
    # the variables' names are the template's, not text it renders
    chat.variables = {name: marker.mark(value) for name, value in chat.variables.items()}
    chat.is_marked = marker.num_marked > 0


class _ControlTokens:
    """A tokenizer's control tokens: the strings a template's own text may use as control tokens.

    The special tokens, and the tokenizer's `chat_control_tokens` or else the added tokens the
    template's text spells, as Transformers' `sanitize_control_tokens` chooses them (the
    template's source is searched, not compiled: a job's own template is compiled only in the
    sandbox). Built once per tokenizer; the tables for a set of tokens once per set."""

    def __init__(self, tokenizer) -> None:
        added = tokenizer.added_tokens_decoder.values()
        chosen = getattr(tokenizer, "chat_control_tokens", None)
        self._fixed = {t.content for t in added if t.special} | set(tokenizer.all_special_tokens)
        if chosen is not None:
            self._fixed |= {t.content for t in added if t.content in set(chosen)}
            others = []
        else:
            others = [t.content for t in added if t.content not in self._fixed and not t.content.isspace()]
        self._fixed.discard("")
        self._other_tokens = others
        # one scan of a template (a job's may have a megabyte) finds the added tokens it spells
        self._others = re.compile(_trie_pattern(tuple(others))) if others else None

    @classmethod
    def of(cls, tokenizer) -> _ControlTokens:
        if (control := _CONTROL_TOKENS_OF.get(tokenizer)) is None:
            control = _CONTROL_TOKENS_OF[tokenizer] = cls(tokenizer)
        return control

    def for_template(self, template: str | dict | None) -> _MarkingTables | None:
        if isinstance(template, dict):  # named templates: any of them may be the one rendered
            template = "\0".join(template.values())
        found = set(self._others.findall(template)) if self._others is not None and template else set()
        if found:  # a token spelt only inside a longer one the scan took
            found |= {t for t in self._other_tokens if any(t in f for f in found)}
        tokens = tuple(sorted(self._fixed | found))
        return _marking_tables(tokens) if tokens else None


_CONTROL_TOKENS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _ControlTokens


@dataclass(frozen=True, slots=True)
class _MarkingTables:
    pattern: re.Pattern  # any control token, the longest where several match
    starts: frozenset[str]  # every control token's proper prefixes
    ends: frozenset[str]  # every control token's proper suffixes of two characters or more
    longest: int


@functools.lru_cache(maxsize=32)
def _marking_tables(tokens: tuple[str, ...]) -> _MarkingTables:
    return _MarkingTables(
        re.compile(_trie_pattern(tokens)),
        frozenset(t[:k] for t in tokens for k in range(1, len(t))),
        frozenset(t[-k:] for t in tokens for k in range(2, len(t))),
        max(map(len, tokens)),
    )


def _trie_pattern(tokens: tuple[str, ...]) -> str:
    """A regular expression matching any of `tokens`, the longest where several match: as a trie,
    so that a text is scanned once, not once per token (Gemma has thousands of special tokens)."""
    trie: dict = {}
    for token in tokens:
        node = trie
        for char in token:
            node = node.setdefault(char, {})
        node[""] = {}

    def walk(node: dict) -> str:
        branches = [re.escape(char) + walk(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer token first

    return walk(trie)


class _Marker:
    """Marks the control tokens a string spells (transformers' mark_control_tokens, which also
    drops any marker characters the string had), and puts a lone marker after a string that ends
    with the start of a control token or before one that starts with the end of one (two
    characters at least), so that two strings (or a string and the template's text) cannot join
    into a control token: encode_marked_chat encodes the text on each side of a marker apart."""

    # Deeper values are refused (RecursionError) at this depth, not at the interpreter's recursion
    # limit: that one is raised by some libraries in the process (torch's inductor sets 2000), so
    # a bound left to it would hold in one process and not in another.
    MAX_DEPTH = 256

    def __init__(self, tables: _MarkingTables) -> None:
        self._tables = tables
        self.num_marked = 0

    def mark(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self._mark_string(value)
        if isinstance(value, dict | list | tuple) and depth >= self.MAX_DEPTH:
            raise RecursionError(f"nested deeper than {self.MAX_DEPTH} levels")
        if isinstance(value, dict):
            return {
                self.mark(k) if isinstance(k, str) else k: self.mark(v, depth + 1) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.mark(v, depth + 1) for v in value]
        return value

    def _mark_string(self, text: str) -> str:
        tables = self._tables
        marked = mark_control_tokens(text, tables.pattern)
        longest = min(tables.longest, len(marked) + 1)
        if any(marked[-k:] in tables.starts for k in range(1, longest)):
            marked += _CONTROL_TOKEN_END
        if any(marked[:k] in tables.ends for k in range(2, longest)):
            marked = _CONTROL_TOKEN_END + marked
        if marked != text:
            self.num_marked += 1
        return marked


def _special_tokens_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when asked to add its special tokens."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    framed = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(framed) - len(plain) + 1):
        if framed[i : i + len(plain)] == plain:
            return framed[:i], framed[i + len(plain) :]
    return [], []


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
