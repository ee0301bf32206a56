"""Where one engine step's wall time goes, phase by phase (schedule -> plan -> execute -> update ->
stages -> outputs), timed by wrapping each phase's entry point on a live engine.

    .venv/bin/python loadtest/profile_engine.py --preset micro --workload decode --dtype float32 --phases

On the `micro` checkpoint a step's arithmetic is negligible, so every phase but the model's
forward is host work, and the forward itself is mostly the per-call overhead of its kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from engine import LLMEngine
from engine import llm_engine as llm_engine_module
from engine.core import step_plan

# (phase, what it covers), in step order
PHASES = (
    ("schedule", "Scheduler.schedule: what runs, block allocation, prefix-cache lookups"),
    ("plan", "PromptLogprobRows/PoolingRows.of + StepPlan.build: the step's lists"),
    ("input build", "ModelRunner._prepare: the plan's lists into tensors, attention metadata"),
    ("forward", "the model's forward (ModelRunner._forward less _prepare): kernels and their dispatch"),
    ("sample", "ModelRunner._sample: logits rows, SamplingBatch, the sampler"),
    ("host sync", "_on_host: sampled ids and logprobs to Python lists"),
    ("update", "Scheduler.update_from_output: tokens appended, stops, blocks freed or cached"),
    ("stages", "every PostStepStage.update (n/best_of, choices, pooling)"),
    ("outputs", "OutputProcessor.process, LLMEngine._apply and _pass_down"),
)


class StepPhases:
    """Times the phases of every step an engine runs from here on (one engine, one thread)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.step_seconds = 0.0
        self._originals: list[tuple[object, str, object]] = []  # restored by close()
        runner = engine.runner
        self._wrap(engine, "step", None)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(runner, "_prepare", "input build")
        self._wrap(runner, "_forward", "forward")
        self._wrap(runner, "_sample", "sample")
        for stage in engine.stages:
            self._wrap(stage, "update", "stages")
        self._wrap(engine.output_processor, "process", "outputs")
        self._wrap(engine, "_apply", "outputs")
        self._wrap(engine, "_pass_down", "outputs")
        self._wrap(llm_engine_module, "_on_host", "host sync")
        for rows in (step_plan.PromptLogprobRows, step_plan.PoolingRows, step_plan.StepPlan):
            name = "of" if rows is not step_plan.StepPlan else "build"
            self._originals.append((rows, name, rows.__dict__[name]))
            setattr(rows, name, classmethod(self._timed(getattr(rows, name).__func__, "plan", bound=rows)))

    def close(self) -> None:
        """Put back what was wrapped (the classes' and the module's functions are shared)."""
        for owner, name, original in reversed(self._originals):
            if original is None:
                delattr(owner, name)  # an instance attribute over the class's method
            else:
                setattr(owner, name, original)
        self._originals.clear()

    def __enter__(self) -> StepPhases:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wrap(self, owner, name: str, phase: str | None) -> None:
        # an instance's method lives on its class: undone by deleting the instance attribute
        own = vars(owner).get(name) if isinstance(owner, type(llm_engine_module)) else None
        self._originals.append((owner, name, own))
        setattr(owner, name, self._timed(getattr(owner, name), phase))

    def _timed(self, function: Callable, phase: str | None, bound=None) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return (
                    function(bound, *args[1:], **kwargs) if bound is not None else function(*args, **kwargs)
                )
            finally:
                elapsed = time.perf_counter() - start
                if phase is None:
                    self.steps += 1
                    self.step_seconds += elapsed
                else:
                    self.seconds[phase] += elapsed

        return timed

    def table(self) -> str:
        """Milliseconds per step by phase; `forward` excludes the input build it calls."""
        seconds = dict(self.seconds)
        seconds["forward"] = seconds.get("forward", 0.0) - seconds.get("input build", 0.0)
        per_step = 1000 / max(self.steps, 1)
        lines = [
            f"{self.steps} steps, {self.step_seconds * per_step:.2f} ms per step",
            f"| {'phase':<12} | {'ms/step':>8} | {'share':>6} | covers",
            f"|{'-' * 14}|{'-' * 10}|{'-' * 8}|{'-' * 8}",
        ]
        for phase, covers in PHASES:
            value = seconds.get(phase, 0.0)
            lines.append(
                f"| {phase:<12} | {value * per_step:8.3f} | {value / self.step_seconds:6.1%} | {covers}"
            )
        other = self.step_seconds - sum(seconds.values())
        lines.append(
            f"| {'other':<12} | {other * per_step:8.3f} | {other / self.step_seconds:6.1%} | the rest of step()"
        )
        return "\n".join(lines)
