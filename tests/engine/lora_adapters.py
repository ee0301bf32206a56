"""PEFT LoRA adapters of a tiny test checkpoint, with random nonzero A and B, and their PEFT greedy
output; the adapter set and the mixed batches the engine's LoRA tests share."""

from __future__ import annotations

import random

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from tests.engine.transformers_greedy import greedy_continuations

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoraConfig options): every projection; only attention, rsLoRA, another rank
ADAPTERS = {
    "all": {"r": 8, "lora_alpha": 16, "target_modules": ALL_TARGETS},
    "attn": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "mlp": {"r": 2, "lora_alpha": 4, "target_modules": ["up_proj", "down_proj", "k_proj"]},
}


def random_prompts(vocab: int, lengths=(3, 17, 40, 9, 24, 5), seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in lengths]


def mixed_batch(
    prompts, names, max_tokens: int
) -> tuple[list[list[int]], list[SamplingParams], list[tuple[str | None, int]]]:
    """Every prompt with every adapter of `names` (None: the base model), interleaved; with each
    request's owner (adapter name, prompt index)."""
    batch, params, owners = [], [], []
    for i, prompt in enumerate(prompts):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            batch.append(prompt)
            params.append(
                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, lora_name=name)
            )
            owners.append((name, i))
    return batch, params, owners


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
