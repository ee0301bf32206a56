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

from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.outputs import RequestOutput

PoolingType = Literal["last", "mean"]


@dataclass(frozen=True, slots=True)
class PoolingParams:
    pooling: PoolingType = "last"

    def __post_init__(self) -> None:
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")


@dataclass(slots=True)
class PoolingRows:
    """The rows of a step's flat hidden states that pooling sequences need, with their owners."""

    rows: list[int] = field(default_factory=list)
    owners: list[Sequence] = field(default_factory=list)
    restarts: list[Sequence] = field(default_factory=list)  # mean pooling computing from position 0

    @classmethod
    def of(cls, out: SchedulerOutput) -> PoolingRows | None:
        rows = cls()
        offset = 0
        for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            if seq.pooling == "mean":
                if start == 0:
                    rows.restarts.append(seq)
                rows.rows += range(offset, offset + num_new)
                rows.owners += [seq] * num_new
            elif seq.pooling == "last" and start + num_new == seq.num_tokens:
                rows.rows.append(offset + num_new - 1)
                rows.owners.append(seq)
            offset += num_new
        return rows if rows.rows else None


class Pooler:
    """Owns the running sums of every pooling request, by object."""

    def __init__(self) -> None:
        self._sums: dict[Sequence, tuple[torch.Tensor, int]] = {}  # (sum of rows, rows counted)

    def update(self, rows: PoolingRows | None, pooled: torch.Tensor | None) -> None:
        """After a step: add its pooled rows ([R, H] float32, in `rows` order) to their sequences."""
        if rows is None or pooled is None:
            return
        for seq in rows.restarts:
            self._sums.pop(seq, None)
        pooled = pooled.cpu()
        for row, seq in enumerate(rows.owners):
            total, count = self._sums.get(seq, (0.0, 0))
            self._sums[seq] = (pooled[row] + total, count + 1)

    def hold(self, seq: Sequence, output: RequestOutput) -> RequestOutput:
        """A finished request's output, with its embedding if it is a pooling request."""
        if seq.pooling is None:
            return output
        total, count = self._sums.pop(seq, (None, 0))
        if output.finish_reason != "abort" and total is not None:
            output.embedding = (total / count).tolist()
            output.finish_reason, output.stop_reason = "stop", None
        return output

    def abort(self, seq: Sequence) -> None:
        self._sums.pop(seq, None)
