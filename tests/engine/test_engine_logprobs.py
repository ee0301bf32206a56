"""Logprobs through the whole engine: one entry per generated token, only for requests that ask."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams


def test_greedy_logprobs_are_the_raw_model_distribution_and_only_where_asked(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=64))
    asked = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
    silent = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with_logprobs, without = engine.generate([[1, 5, 6], [1, 7]], [asked, silent], use_tqdm=False)
    assert without.logprobs is None
    assert [lp.token_id for lp in with_logprobs.logprobs] == with_logprobs.token_ids
    for lp in with_logprobs.logprobs:
        assert len(lp.top) == 2
        assert lp.top[0][0] == lp.token_id and math.isclose(lp.top[0][1], lp.logprob, abs_tol=1e-6)  # greedy
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        first = torch.log_softmax(reference(torch.tensor([[1, 5, 6]])).logits[0, -1], -1)
    assert math.isclose(
        with_logprobs.logprobs[0].logprob, first[with_logprobs.token_ids[0]].item(), abs_tol=1e-4
    )
