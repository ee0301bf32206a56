"""Checkpoint names of mixture-of-experts families: per-expert or stacked tensors to stacked parameters.

Either layout loads, whichever a checkpoint holds:
- per expert: one tensor per expert and projection (`...experts.3.w1.weight`,
  `...experts.3.gate_proj.weight`), as published checkpoints are and as Transformers 5.24's
  save_pretrained writes by default; the engine stacks them;
- stacked: `...mlp.experts.gate_up_proj` [E, 2I, H] (each expert's [gate; up] rows) and
  `...mlp.experts.down_proj` [E, H, I], no `.weight` suffix, as Transformers 5.24 holds them in
  memory and writes them with save_pretrained(save_original_format=False): engine.layers.moe
  .FusedMoE's own layout, copied as it is (each rank's part only under tensor or expert
  parallelism).
engine.loader.weights asks the model through two hooks: `expert_tensor(name)` (the parameter and
shard id a checkpoint tensor fills, or None) and `expert_sources(param_name)` (the checkpoint
tensors a stacked parameter needs, or None): the stacked tensor itself once the checkpoint
was seen to hold stacked experts, else every expert's.
"""

from __future__ import annotations

import re
from typing import ClassVar

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_STACKED = re.compile(r"^.*\.experts\.(gate_up_proj|down_proj)$")


class ExpertCheckpoint:
    """Mixin for a DecoderForCausalLM whose checkpoint stores each expert's projections apart."""

    # checkpoint projection name -> (stacked parameter, half of gate_up (0 gate, 1 up) or None)
    expert_projections: ClassVar[dict[str, tuple[str, int | None]]] = {}

    def expert_tensor(self, name: str) -> tuple[str, object] | None:
        if _STACKED.match(name):  # stacked: our parameter's name and layout
            self._stacked_expert_tensors = {*self._stacked_names(), name}
            return name, None
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
        if self._stacked_names():  # a stacked checkpoint: a missing stacked tensor is named as such
            return [param_name]
        num_experts = num_experts_of(self.config)
        return [f"{prefix}.{e}.{proj}.weight" for e in range(num_experts) for proj in projections]

    def _stacked_names(self) -> set[str]:
        # the stacked tensors load_weights has met so far (set as it reads the checkpoint)
        return getattr(self, "_stacked_expert_tensors", set())


def num_experts_of(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts
