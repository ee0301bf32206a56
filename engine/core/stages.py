"""The post-step stages' one contract: what a step hands them, and what they hand back.

A stage is a feature that follows some requests across steps with an object of its own:
parallel samples (n / best_of), choice scoring, pooling. After each step's update the engine
calls every stage's `update` with the step's results; later, each finished sequence's output
passes down the stages' `hold` in order. A stage never touches the scheduler or another stage:
it returns what it wants done (StageEffects), and the engine applies every stage's effects in
one place, so a step's arrows run one way (schedule -> plan -> execute -> update -> stages ->
outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.outputs import RequestOutput, SampledLogprobs

if TYPE_CHECKING:
    import torch

    from engine.core.step_plan import PoolingRows, PromptLogprobRows


@dataclass(slots=True)
class StepResult:
    """What one step computed, on the host (after its one sync): what the update and stages read."""

    scheduled: SchedulerOutput
    token_ids: list[int]  # one sampled token per sampling sequence, in batch order
    logprobs: SampledLogprobs | None  # the sampled rows' logprobs, where a row asked for them
    prompt_logprob_rows: PromptLogprobRows | None = None  # whose prompt logprobs the step computed
    prompt_logprobs: list[float] = field(default_factory=list)  # [R], in prompt_logprob_rows order
    # ([R, K] ids, [R, K] logprobs) as lists: each prompt logprob row's most likely tokens, if asked
    prompt_top_logprobs: tuple[list[list[int]], list[list[float]]] | None = None
    pooling_rows: PoolingRows | None = None  # whose final hidden states the step pooled
    pooled_hidden: torch.Tensor | None = None  # [P, H] float32 on the host, in pooling_rows order


@dataclass(slots=True)
class StageEffects:
    """What a stage asks the engine to do; the engine applies it in one place (LLMEngine._apply)."""

    # new sequences of a request already running (its samples, its choices' scorers): the
    # engine schedules them and follows their outputs
    forks: list[Sequence] = field(default_factory=list)
    # sequences to take out of the batch, with their finish reason and stop reason
    finish: list[tuple[Sequence, str, str | int | None]] = field(default_factory=list)
    # outputs this stage held that are now complete: they go on down the later stages' holds
    released: list[tuple[Sequence, RequestOutput]] = field(default_factory=list)


class PostStepStage(Protocol):
    """A feature that follows some requests across steps (ParallelSampler, ChoiceScorer, Pooler)."""

    def update(self, step: StepResult) -> StageEffects:
        """After a step's update: record what it computed for this stage's requests."""
        ...

    def hold(self, seq: Sequence, output: RequestOutput) -> tuple[Sequence, RequestOutput] | None:
        """A finished sequence's output: what passes on to the next stage (maybe the output of
        another sequence: a sample's gathered into its request's), or None while this stage holds it."""
        ...

    def abort(self, seq: Sequence) -> StageEffects:
        """Forget the request whose own sequence is `seq`: its forks to finish; its held output,
        released with finish_reason "abort"."""
        ...
