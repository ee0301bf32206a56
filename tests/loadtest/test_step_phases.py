"""The host-overhead benchmark's parts: the decode workload's shape and the per-phase step timer
(loadtest/step_phases.py) on a live engine (tiny model, CPU)."""

from __future__ import annotations

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.core import step_plan
from loadtest.step_phases import PHASES, StepPhases
from loadtest.workloads import WORKLOADS


def test_the_decode_workload_is_128_short_prompts_with_long_outputs():
    workload = WORKLOADS["decode"](2048)
    assert len(workload.prompts) == 128
    assert all(16 <= len(p) <= 64 for p in workload.prompts)
    assert all(128 <= n <= 256 for n in workload.output_lens)
    assert WORKLOADS["decode"](2048).prompts == workload.prompts  # fixed seed: every engine sees the same


def test_the_phases_of_every_step_are_timed_and_sum_to_at_most_the_step(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), num_kv_blocks=64))
    with StepPhases(engine) as phases:
        engine.generate(
            [[1, 5, 6, 7], [1, 8, 9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        )
    assert "timed" not in repr(engine.step) and "timed" not in repr(step_plan.StepPlan.build)  # undone
    assert phases.steps == engine.stats().steps.num_steps
    timed = {phase for phase, _ in PHASES} - {"stages"}  # no request here uses a stage
    assert timed <= {phase for phase, seconds in phases.seconds.items() if seconds > 0}
    assert sum(phases.seconds.values()) - phases.seconds["input build"] <= phases.step_seconds
    table = phases.table()
    assert all(f"| {phase:<12} |" in table for phase, _ in PHASES)
