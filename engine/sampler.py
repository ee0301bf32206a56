"""Turns one sequence's next-token logits into a token id under its SamplingParams."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def sample_next_token(
    logits: torch.Tensor,  # [V] float32
    params: SamplingParams,
    seen_token_ids: torch.Tensor,  # [P + O] prompt and output so far (repetition penalty)
    output_token_ids: torch.Tensor,  # [O] (presence and frequency penalties)
    generator: torch.Generator,
) -> int:
    logits = _apply_penalties(logits.float().clone(), params, seen_token_ids, output_token_ids)
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = _apply_top_k_top_p_min_p(probs, params)
    return int(torch.multinomial(probs, 1, generator=generator))


def _apply_penalties(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    if params.repetition_penalty != 1.0 and seen.numel():
        ids = torch.unique(seen)
        picked = logits[ids]
        # vLLM's (and Transformers') convention: shrink positive logits, push negative ones down.
        logits[ids] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output.numel():
        counts = torch.bincount(output, minlength=logits.numel()).to(logits.dtype)[: logits.numel()]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _apply_top_k_top_p_min_p(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k > 0 and params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
        # keep the smallest prefix whose mass reaches top_p
        sorted_probs[mass_before >= params.top_p * sorted_probs.sum()] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs / probs.sum()
