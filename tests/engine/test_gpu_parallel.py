"""Tensor and pipeline parallelism over NCCL on two GPUs give one GPU's greedy tokens (float32)."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
    ),
]

PROMPTS = [[1, 17, 99, 4, 250], [1, *range(10, 70)], [1, 8], [1, *range(100, 133)]]


def _greedy(config: EngineConfig) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    with LLMEngine(config) as engine:
        return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_two_gpus_match_one(tiny_checkpoint, tp, pp):
    options = {
        "model": str(tiny_checkpoint),
        "device": "cuda",
        "attention_backend": "sdpa",
        "num_kv_blocks": 256,
    }
    single = _greedy(EngineConfig(**options))
    assert _greedy(EngineConfig(**options, tensor_parallel_size=tp, pipeline_parallel_size=pp)) == single
