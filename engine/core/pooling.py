"""Pooling (embedding) requests: a prompt's final hidden states pooled into one vector.

A pooling request is a prefill-only sequence (it samples nothing) that runs in the same steps
as generation. Each step the engine names the rows of the step's flat final hidden states
(after the last norm) that a pooling sequence needs (PoolingRows); the model runner returns
those rows; the Pooler adds them up per sequence and hands the request's output its vector.

`last`: the hidden state of the prompt's last token (always computed, never taken from the
prefix cache). `mean`: the mean over every prompt position, so a mean-pooling sequence takes
nothing from the prefix cache (`Sequence.first_logits_position` is 0) and a recompute after
preemption starts its sum again. The vector is raw; normalising is the front end's.

Pipeline parallelism is refused: the last stage, not rank 0, holds the hidden states; tensor
parallel ranks all hold them whole, and rank 0 pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.core.sequence import Sequence
from engine.core.stages import StageEffects, StepResult
from engine.outputs import RequestOutput

PoolingType = Literal["last", "mean"]


@dataclass(frozen=True, slots=True)
class PoolingParams:
    pooling: PoolingType = "last"

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")


class Pooler:
    """Owns the running sums of every pooling request, by object (a PostStepStage)."""

    def __init__(self) -> None:
        self._sums: dict[Sequence, tuple[torch.Tensor, int]] = {}  # (sum of rows, rows counted)

    def update(self, step: StepResult) -> StageEffects:
        """After a step: add its pooled rows ([R, H] float32, in pooling_rows order) to their sequences."""
        rows, pooled = step.pooling_rows, step.pooled_hidden
        if rows is not None and pooled is not None:
            for seq in rows.restarts:
                self._sums.pop(seq, None)
            for row, seq in enumerate(rows.owners):
                total, count = self._sums.get(seq, (0.0, 0))
                self._sums[seq] = (pooled[row] + total, count + 1)
        return StageEffects()

    def hold(self, seq: Sequence, output: RequestOutput) -> tuple[Sequence, RequestOutput]:
        """A finished request's output, with its embedding if it is a pooling request (never held)."""
        if seq.pooling is None:
            return seq, output
        total, count = self._sums.pop(seq, (None, 0))
        if output.finish_reason != "abort" and total is not None:
            output.embedding = (total / count).tolist()
            output.finish_reason, output.stop_reason = "stop", None
        return seq, output

    def abort(self, seq: Sequence) -> StageEffects:
        self._sums.pop(seq, None)
        return StageEffects()
