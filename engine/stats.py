"""EngineStats: running totals of the engine's steps, for monitoring.

Written by the thread that calls step(), read by anyone (the service's /metrics): plain ints,
so a reader sees each total as of some step, never a torn value.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0  # non-empty steps run
    num_step_seqs: int = 0  # sequences scheduled, summed over steps: / num_steps = mean batch size
    num_step_tokens: int = 0  # tokens computed (prompt chunks + decodes), summed over steps
    num_preemptions: int = 0  # sequences that lost their KV blocks and will be recomputed

    def record(self, out: SchedulerOutput) -> None:
        self.num_steps += 1
        self.num_step_seqs += len(out.seqs)
        self.num_step_tokens += out.num_batched_tokens
        self.num_preemptions += len(out.preempted)
