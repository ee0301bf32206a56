"""SamplingParams: the engine's own description of how to pick tokens for one request."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# Temperatures below this are greedy: dividing float32 logits by less overflows them to inf (NaN
# probabilities), and a temperature that rounds to 0.0 in float32 would be sampled at 1.0 (vLLM's eps).
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """A constraint on the output: exactly one of the fields is set.

    choice: the output is exactly one of these strings (and the engine reports each one's
    probability); regex: the output fully matches it; json: a JSON schema (a dict or its JSON
    text) the output validates against; json_object: any JSON object.
    """

    choice: list[str] | None = None
    regex: str | None = None
    json: dict[str, Any] | str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("choice", "regex", "json") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"a structured output takes exactly one of choice, regex, json, json_object; got {given or 'none'}"
            )
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            if len(set(self.choice)) != len(self.choice):
                raise ValueError("choice must not list a string twice")
        if self.regex is not None and not self.regex:
            raise ValueError("regex must not be empty")
        if isinstance(self.json, str):
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"json is not a JSON schema: {e}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError(f"json must be a JSON schema object, got {type(self.json).__name__}")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE, made 0): greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same output
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # top alternatives returned with each sampled token's logprob; None: no logprobs,
    # 0: only the sampled token's own logprob
    logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None  # constrains what may be generated

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
