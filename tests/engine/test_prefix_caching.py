"""Automatic prefix caching changes how much is computed, never what comes out.

Greedy float32 outputs on the tiny checkpoint are token-for-token the same with caching on and
off, also when the KV pool is so small that sequences are preempted and recomputed.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams

SHARED_PREFIX_LEN = 40  # two and a half 16-token blocks


def _prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [1] + [rng.randrange(4, vocab) for _ in range(SHARED_PREFIX_LEN - 1)]
    return [shared + [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _greedy_all(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 16}, id="small-chunks"),
        pytest.param({"enable_chunked_prefill": False}, id="no-chunking"),
        pytest.param({"num_kv_blocks": 40, "block_size": 4, "max_num_batched_tokens": 32}, id="preemption"),
    ],
)
def test_outputs_are_identical_with_prefix_caching_on_and_off(tiny_checkpoint: Path, options: dict) -> None:
    results, engines = {}, {}
    for caching in (False, True):
        engine = LLMEngine(
            EngineConfig(
                dtype="float32", model=str(tiny_checkpoint), enable_prefix_caching=caching, **options
            )
        )
        prompts = _prompts(engine.vocab_size)
        # twice: the second round finds every prompt's full blocks in the cache
        results[caching] = _greedy_all(engine, prompts) + _greedy_all(engine, prompts)
        engines[caching] = engine
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert all(count == 0 for count in engine.block_manager.ref_counts)
    assert results[True] == results[False]
    stats = engines[True].stats()
    assert stats.prefix_cache_hit_tokens > 0 and 0 < stats.prefix_cache_hit_rate < 1
    assert engines[False].stats().prefix_cache_queried_tokens == 0


def test_preemption_happens_with_caching_on_in_the_small_pool(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(
        EngineConfig(
            dtype="float32",
            model=str(tiny_checkpoint),
            num_kv_blocks=40,
            block_size=4,
            max_num_batched_tokens=32,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = engine.generate(_prompts(engine.vocab_size), params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0


def test_a_repeated_prompt_reuses_all_its_full_blocks(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), block_size=16))
    prompt = _prompts(engine.vocab_size, n=1)[0][:33]  # 2 full blocks + 1 token
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = engine.generate([prompt], params, use_tqdm=False)[0]
    stats = engine.stats()
    assert (stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (33, 0)
    second = engine.generate([prompt], params, use_tqdm=False)[0]
    stats = engine.stats()
    assert (stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (66, 32)
    assert second.token_ids == first.token_ids


def test_aborting_requests_that_share_cached_blocks_gives_every_block_back(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), num_kv_blocks=64))
    prompts = _prompts(engine.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.generate(prompts[:1], params, use_tqdm=False)  # caches the shared prefix
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.step()
    engine.step()
    for i in range(0, len(prompts), 2):
        assert engine.abort(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(count == 0 for count in bm.ref_counts)
    assert engine.stats().prefix_cache_hit_tokens >= 32 * len(prompts)


def test_a_burst_of_prompts_sharing_a_prefix_computes_the_prefix_once(tiny_checkpoint: Path) -> None:
    # all four arrive together: the first computes the shared blocks, the others wait one step for them
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), block_size=16))
    prompts = _prompts(engine.vocab_size, n=4)  # a 40-token shared prefix: 2 full blocks
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert engine.stats().prefix_cache_hit_tokens == 3 * 32
    assert engine.stats().prefix_cache_queried_tokens == sum(len(p) for p in prompts)
    assert len(outputs) == 4
