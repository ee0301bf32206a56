"""Prompt templates: one row's fields -> the job body of one labelling request.

A template is Jinja2 when it contains `{{` or `{%` (fields as variables), else Python
`str.format` (fields by name). A field the template names but the row lacks is an error for
that row, never an empty string in the prompt.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
import msgspec

from schemas.batch import CHAT_URL, COMPLETIONS_URL, BatchRequestEnvelope, Endpoint

TemplateKind = Literal["auto", "jinja", "format"]


class TemplateError(ValueError):
    """The template cannot be rendered for a row (a missing field, a Jinja error)."""


class PromptTemplate:
    def __init__(self, text: str, kind: TemplateKind = "auto") -> None:
        if kind == "auto":
            kind = "jinja" if ("{{" in text or "{%" in text) else "format"
        self.kind = kind
        self.text = text
        if kind == "jinja":
            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
            try:
                self._jinja = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"the Jinja template does not parse: {e} (line {e.lineno})") from None
        else:
            try:
                list(string.Formatter().parse(text))
            except ValueError as e:
                raise TemplateError(f"the str.format template does not parse: {e}") from None

    def render(self, fields: dict[str, Any]) -> str:
        try:
            if self.kind == "jinja":
                return self._jinja.render(**fields)
            return self.text.format_map(fields)
        except (jinja2.UndefinedError, KeyError) as e:
            raise TemplateError(f"the template needs a field the row lacks: {e}") from None
        except (jinja2.TemplateError, ValueError, IndexError, AttributeError, TypeError) as e:
            raise TemplateError(f"the template cannot be rendered for this row: {e}") from None


@dataclass(slots=True)
class JobSpec:
    """How every row's job is asked: endpoint, sampling and the optional set of labels."""

    model: str
    max_tokens: int
    temperature: float = 0.0
    choices: list[str] = field(default_factory=list)  # the output must be one of these
    chat: bool = False  # /v1/chat/completions through the model's chat template
    system: str | None = None  # a system message for chat jobs
    logprobs: int | None = None  # top-K alternatives of every generated token, returned with the result

    @property
    def url(self) -> Endpoint:
        return CHAT_URL if self.chat else COMPLETIONS_URL

    def job(self, custom_id: str, prompt: str) -> BatchRequestEnvelope:
        """The OpenAI Batch input line for one rendered prompt."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        body["temperature"] = self.temperature
        if self.chat:
            system = [{"role": "system", "content": self.system}] if self.system else []
            body["messages"] = [*system, {"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.logprobs is not None:
            if self.chat:
                body |= {"logprobs": True, "top_logprobs": self.logprobs}
            else:
                body["logprobs"] = self.logprobs
        if self.choices:
            # vLLM's field; the engine keeps the output to one of the choices and reports their probabilities
            body["structured_outputs"] = {"choice": list(self.choices)}
        return BatchRequestEnvelope(
            custom_id=custom_id, url=self.url, body=msgspec.Raw(msgspec.json.encode(body))
        )
