"""Checkpoint names of mixture-of-experts families: per-expert tensors to stacked parameters.

Transformers 5.24 saves Mixtral's and Qwen3-MoE's experts one tensor per expert and
projection (`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`); the engine stacks them
into engine.layers.moe.FusedMoE's gate_up_proj [E, 2I, H] and down_proj [E, H, I].
engine.weights asks the model through two hooks: `expert_tensor(name)` (the parameter and
shard id a checkpoint tensor fills, or None) and `expert_sources(param_name)` (the checkpoint
tensors a stacked parameter needs, or None).
"""

from __future__ import annotations

import re
from typing import ClassVar

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class ExpertCheckpoint:
    """Mixin for a DecoderForCausalLM whose checkpoint stores each expert's projections apart."""

    # checkpoint projection name -> (stacked parameter, half of gate_up (0 gate, 1 up) or None)
    expert_projections: ClassVar[dict[str, tuple[str, int | None]]] = {}

    def expert_tensor(self, name: str) -> tuple[str, object] | None:
        match = _PER_EXPERT.match(name)
        if match is None or match["proj"] not in self.expert_projections:
            return None
        param, half = self.expert_projections[match["proj"]]
        expert = int(match["expert"])
        return f"{match['prefix']}.{param}", expert if half is None else (expert, half)

    def expert_sources(self, param_name: str) -> list[str] | None:
        prefix, _, last = param_name.rpartition(".")
        projections = [proj for proj, (param, _) in self.expert_projections.items() if param == last]
        if not prefix.endswith(".experts") or not projections:
            return None
        num_experts = num_experts_of(self.config)
        return [f"{prefix}.{e}.{proj}.weight" for e in range(num_experts) for proj in projections]


def num_experts_of(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts
