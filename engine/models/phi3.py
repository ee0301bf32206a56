"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's decoder with fused checkpoint projections.

The checkpoint holds q/k/v as one `qkv_proj` tensor ([q; k; v] rows) and gate/up as one
`gate_up_proj` ([gate; up]): the fused layers load them whole, each tensor-parallel rank
taking its heads of each part. Partial rotary (`partial_rotary_factor`, Phi-4-mini) and
LongRoPE (`longrope`, formerly `su`) come from engine.layers.rotary.
"""

from __future__ import annotations

from typing import ClassVar

from engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # the checkpoint's names are the fused ones already
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {}


ARCHITECTURES = {"Phi3ForCausalLM": Phi3ForCausalLM}
