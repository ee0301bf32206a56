"""Engine statistics: running step totals, and the snapshot `LLMEngine.stats()` hands to monitoring.

The totals are written by the thread that calls step() and read by anyone (the service's
/metrics): plain ints, so a reader sees each total as of some step, never a torn value.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.scheduler import SchedulerOutput


@dataclass(slots=True)
class StepTotals:
    num_steps: int = 0  # non-empty steps run
    num_step_seqs: int = 0  # sequences scheduled, summed over steps: / num_steps = mean batch size
    num_step_tokens: int = 0  # tokens computed (prompt chunks + decodes), summed over steps
    num_preemptions: int = 0  # sequences that lost their KV blocks and will be recomputed

    def record(self, out: SchedulerOutput) -> None:
        self.num_steps += 1
        self.num_step_seqs += len(out.seqs)
        self.num_step_tokens += out.num_batched_tokens
        self.num_preemptions += len(out.preempted)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine as of one moment: queue, KV cache, prefix cache and step totals."""

    num_running_seqs: int  # sequences in the running batch
    num_waiting_seqs: int  # sequences waiting to be admitted (new or preempted)
    num_kv_blocks: int
    num_free_kv_blocks: int  # never-cached free blocks plus evictable cached ones
    prefix_cache_queried_tokens: int  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hit_tokens: int  # ...and found there, not recomputed
    steps: StepTotals
    # LoRA adapters (engine/lora/slots.py): found in a slot by a step, loaded into one, and the
    # time loading took; 0 without adapters
    lora_slot_hits: int = 0
    lora_slot_loads: int = 0
    lora_load_seconds: float = 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV-cache blocks in use."""
        return 1 - self.num_free_kv_blocks / self.num_kv_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        queried = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / queried if queried else 0.0
