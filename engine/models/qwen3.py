"""Qwen3 (dense): Llama's decoder with an RMSNorm on each head's query and key before RoPE."""

from __future__ import annotations

from engine.layers.norm import RMSNorm
from engine.models.base import DecoderForCausalLM
from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = RMSNorm
    # A multi-token-prediction head (`mtp.*`, as Qwen3-Next checkpoints ship one) is not used.
    ignored_checkpoint_tensors = (*DecoderForCausalLM.ignored_checkpoint_tensors, r"^mtp\.")


ARCHITECTURES = {"Qwen3ForCausalLM": Qwen3ForCausalLM}
