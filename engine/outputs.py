"""What the engine hands back: RequestOutput for one request, and the raw per-step tensors the
sampler produces for the core to turn into outputs (SampledLogprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float  # time.time() when add_request was called
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass(slots=True)
class OutputLogprob:
    """One generated token's logprob and its most likely alternatives."""

    token_id: int
    logprob: float  # of the raw model distribution (before penalties and temperature)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives, best first


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token included if one ended the request
    text: str  # generated text; stop string and special tokens excluded unless the params include them
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    metrics: RequestMetrics
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[OutputLogprob] | None = None  # one per generated token, when asked for
    # a `choice` structured output's probability of each choice, renormalised over the choices
    choice_probabilities: dict[str, float] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, where recorded
    # n > 1 (or best_of > 1): the returned samples, by choice index; the request's own fields are
    # samples[0]'s. None for a request with one sample.
    samples: list[RequestOutput] | None = None
    embedding: list[float] | None = None  # a pooling request's pooled final hidden state (raw)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class SampledLogprobs:
    """Raw logprobs: log_softmax of the model's logits, before penalties and temperature."""

    sampled_logprobs: torch.Tensor  # [N] float32: each row's sampled token
    top_token_ids: torch.Tensor  # [N, K] int64, most likely first; K = max over rows, >= 1
    top_logprobs: torch.Tensor  # [N, K] float32, descending; a row asking for k < K uses [:k]
