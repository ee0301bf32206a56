"""Transformers' greedy generation of each prompt alone: the reference our engine's tokens must equal."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM


def transformers_greedy(
    folder, dtype: torch.dtype, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Each prompt's new tokens, EOS an ordinary token (as with the engine's ignore_eos)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return greedy_continuations(model, prompts, max_new_tokens)


def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A loaded Transformers model's greedy new tokens for each prompt alone, EOS an ordinary token."""
    model.generation_config.eos_token_id = None
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,  # by name: a PeftModel's generate takes it only so
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs
