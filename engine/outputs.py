"""What the engine hands back: RequestOutput for one request; and what a step hands back to the
engine: the model runner's ModelRunnerOutput (its sampled tokens and SampledLogprobs, prompt
logprobs, pooled hidden states), which the core turns into outputs."""

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
    # the stop string or stop_token_ids token that ended it; None for EOS, the length limit, a grammar
    stop_reason: str | int | None = None
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


@dataclass(slots=True)
class ModelRunnerOutput:
    """One step's results on the rank that samples (device tensors; ModelRunnerOutput.cpu() to send).

    Every field is None (or empty) where the step asked for nothing of that kind.
    """

    sampled_token_ids: torch.Tensor  # [N] int64: one per sampling row, in batch order
    logprobs: SampledLogprobs | None  # None when no sampling row asked for logprobs
    # [R] float32: the step's prompt logprobs (StepPlan.prompt_logprob_rows), in row order
    prompt_logprobs: torch.Tensor | None = None
    # ([R, K] int64 ids, [R, K] float32 logprobs): each prompt logprob row's K most likely tokens,
    # when a row's request asked for alternatives (a greedy choice's answer)
    prompt_top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None
    # [P, H] float32: the final hidden states at StepPlan.pooling_rows
    pooled_hidden: torch.Tensor | None = None

    # set by to_host_async: recorded after the copies; wait for it before reading the fields
    ready: object | None = None  # torch.cuda.Event

    def cpu(self, non_blocking: bool = False) -> ModelRunnerOutput:
        """A copy on the host, every field included (what a worker sends to rank 0). non_blocking:
        CUDA copies into pinned memory, complete once the stream reaches them (to_host_async)."""

        def host(t: torch.Tensor) -> torch.Tensor:
            if not non_blocking:
                return t.cpu()
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        logprobs = self.logprobs
        if logprobs is not None:
            logprobs = SampledLogprobs(
                host(logprobs.sampled_logprobs), host(logprobs.top_token_ids), host(logprobs.top_logprobs)
            )
        top = self.prompt_top_logprobs
        return ModelRunnerOutput(
            host(self.sampled_token_ids),
            logprobs,
            None if self.prompt_logprobs is None else host(self.prompt_logprobs),
            None if top is None else (host(top[0]), host(top[1])),
            None if self.pooled_hidden is None else host(self.pooled_hidden),
        )

    def to_host_async(self) -> ModelRunnerOutput:
        """CUDA, async scheduling: the results copied to the host behind the step's kernels, with an
        event to wait for. The host then waits for this step only, not for the step queued after
        it on the same stream (a plain .tolist() would wait for both)."""
        copied = self.cpu(non_blocking=True)
        copied.ready = torch.cuda.Event()
        copied.ready.record()
        return copied

    def wait(self) -> None:
        """Block until to_host_async's copies are complete (nothing to wait for otherwise)."""
        if self.ready is not None:
            self.ready.synchronize()
