"""SamplingParams: the engine's own description of how to pick tokens for one request."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit bias: [-100, 100]
# Temperatures below this are greedy: dividing float32 logits by less overflows them to inf (NaN
# probabilities), and a temperature that rounds to 0.0 in float32 would be sampled at 1.0 (vLLM's eps).
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's bound (vLLM checks only >= 0; above 2 the distribution is all but flat)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's and vLLM's range)
# A top_p below float32's smallest normal number would reach the sampler as 0 (or a denormal a
# GPU flushes to 0), which masks every token; at this value it keeps only the top token, as any
# top_p below the top token's probability does, so it is raised to it rather than refused.
MIN_TOP_P = 2.0**-126
# repetition_penalty multiplies or divides a logit: within these bounds a float32 logit times or
# over it stays finite and nonzero (outside them 0 x inf or x / 0 gives NaN or inf logits); a
# penalty of 1e4 already all but bans a seen token.
MIN_REPETITION_PENALTY = 1e-4
MAX_REPETITION_PENALTY = 1e4


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


class SamplingParamsError(ValueError):
    """A value SamplingParams refuses; `field` names the parameter (the service reports it as the
    error's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    n: int = 1  # samples returned (parallel samples of one prompt; see engine/core/parallel_sampling.py)
    best_of: int | None = None  # samples drawn (>= n); the n with the highest cumulative logprob return
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
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens
    # token id -> added to its logit before sampling (penalties and temperature come after);
    # -100 all but bans a token, +100 all but forces it
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True  # special tokens (EOS, chat markers) are left out of the text
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) ends the text
    # EOS and stop token ids that min_tokens holds back: set by the engine when it takes the
    # request (InputProcessor), since the EOS ids are the model's
    min_tokens_stop_ids: frozenset[int] = field(default=frozenset(), repr=False)
    # the LoRA adapter (a name of EngineConfig.lora_adapters) to run the request with; None: the base model
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise SamplingParamsError(
                "min_tokens",
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            )
        for token_id, bias in (self.logit_bias or {}).items():
            if not isinstance(token_id, int) or token_id < 0:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}"
                )
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}"
                )
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be >= 1, got {self.n}")
        if self.best_of is not None and self.best_of < self.n:
            raise SamplingParamsError(
                "best_of", f"best_of must be >= n, got n={self.n} and best_of={self.best_of}"
            )
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN too
            raise SamplingParamsError(
                "temperature", f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}"
            )
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        self.top_p = max(self.top_p, MIN_TOP_P)
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise SamplingParamsError(
                "repetition_penalty",
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise SamplingParamsError(
                    name, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}"
                )
        if not all(isinstance(s, str) and s for s in self.stop):
            # vLLM's rule: an empty stop string would end the output at its first token
            raise SamplingParamsError("stop", "stop strings must not be empty")
        if self.is_greedy and self.num_samples > 1:
            # vLLM's rule: greedy samples would all be the same
            name = "n" if self.best_of is None else "best_of"
            raise SamplingParamsError(
                name, f"{name} must be 1 when using greedy sampling, got {self.num_samples}"
            )
        if self.lora_name is not None and not (isinstance(self.lora_name, str) and self.lora_name):
            raise SamplingParamsError(
                "lora_name", f"lora_name must be a non-empty string, got {self.lora_name!r}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(
                "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}"
            )

    @property
    def num_samples(self) -> int:
        """Sequences sampled for the request: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
