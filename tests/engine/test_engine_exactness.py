"""The paged, continuously batched engine is token-exact against Transformers' generate().

Greedy output must not depend on batch composition, chunking, preemption or backend:
every configuration below reproduces each prompt's solo Transformers generation (float32, CPU).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.demo.checkpoints import ensure_checkpoint
from tests.engine.transformers_greedy import transformers_greedy

ARCHITECTURES = ["tiny", "tiny-mistral", "tiny-qwen2", "tiny-mqa", "tiny-llama3"]
MAX_TOKENS = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 5, 64, 9, 33]  # mixed, several longer than a 16-token block
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in lengths]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, model_cache):
    return ensure_checkpoint(model_cache, preset=request.param)


@pytest.fixture(scope="module")
def expected(checkpoint) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt generated alone by Transformers, greedily, EOS an ordinary token (as with
    ignore_eos; min_new_tokens would forbid it instead)."""
    prompts = _prompts(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    outputs = transformers_greedy(checkpoint, torch.float32, prompts, MAX_TOKENS)
    return prompts, outputs


def _greedy_all(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"enable_chunked_prefill": False}, id="no-chunking"),
        pytest.param({"max_num_batched_tokens": 16}, id="small-chunks"),
        pytest.param({"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 32}, id="preemption"),
        pytest.param({"max_num_seqs": 2, "block_size": 1}, id="two-seqs-block-1"),
    ],
)
def test_greedy_output_matches_transformers_for_a_mixed_batch(checkpoint, expected, options):
    prompts, reference = expected
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(checkpoint), **options))
    assert _greedy_all(engine, prompts) == reference
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_actually_happens_with_a_tiny_kv_budget(checkpoint, expected):
    prompts, reference = expected
    engine = LLMEngine(
        EngineConfig(
            dtype="float32", model=str(checkpoint), num_kv_blocks=24, block_size=4, max_num_batched_tokens=32
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert [o.token_ids for o in outputs] == reference
