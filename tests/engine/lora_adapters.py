"""PEFT LoRA adapters of a tiny test checkpoint, with random nonzero A and B, and their PEFT greedy output."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tests.engine.transformers_greedy import greedy_continuations


def build_adapter(checkpoint, folder, seed: int, **options) -> None:
    """Save a PEFT adapter of `checkpoint` in `folder` (LoraConfig `options`); PEFT starts B at
    zero, so both A and B are drawn at random here and the adapter changes the output."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)


def peft_greedy(checkpoint, folder, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens from Transformers + PEFT with the adapter, EOS an ordinary token."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return greedy_continuations(PeftModel.from_pretrained(base, folder).eval(), prompts, max_new_tokens)
