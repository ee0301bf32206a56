"""The engine on CUDA: token-exact in float32, a KV pool sized from GPU memory, bfloat16 serving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 99, 4, 250], [1, *range(10, 70)], [1, 8]]


def _greedy(engine: LLMEngine, n: int = 10) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def test_float32_greedy_on_cuda_matches_transformers_on_cpu(tiny_checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = reference.generate(
                ids, do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0
            )
            expected.append(out[0, len(prompt) :].tolist())
    engine = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), device="cuda", attention_backend="sdpa")
    )
    assert _greedy(engine) == expected


def test_async_scheduling_gives_the_synchronous_tokens_with_graphs_and_a_mixed_batch(tiny_checkpoint):
    # the default on CUDA: step N+1 runs on N's sampled tokens, which stay on the device
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, stop=[" "]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16, logprobs=2),
    ]
    outputs = {}
    for async_scheduling in (False, True):
        config = EngineConfig(
            dtype="float32", model=str(tiny_checkpoint), device="cuda", async_scheduling=async_scheduling
        )
        engine = LLMEngine(config)
        result = engine.generate(PROMPTS, params, use_tqdm=False)
        outputs[async_scheduling] = [(o.token_ids, o.text, o.finish_reason) for o in result]
        engine.close()
    assert outputs[True] == outputs[False]


def test_kv_pool_is_sized_from_the_gpu_memory_budget(tiny_checkpoint):
    small = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), device="cuda", gpu_memory_utilization=0.3)
    )
    small_blocks = small.block_manager.num_blocks
    del small
    torch.cuda.empty_cache()
    large = LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), device="cuda", gpu_memory_utilization=0.6)
    )
    assert 0 < small_blocks < large.block_manager.num_blocks


def test_bfloat16_engine_serves_a_batch_with_every_backend(tiny_checkpoint):
    backends = ["sdpa"] + (["flash"] if _has_flash() else [])
    for backend in backends:
        engine = LLMEngine(_small_pool_config(str(tiny_checkpoint), "bfloat16", backend))
        outputs = _greedy(engine)
        assert [len(o) for o in outputs] == [10, 10, 10]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_soft_capped_gemma2_gives_the_cpu_tokens_with_every_cuda_backend(model_cache):
    # attention soft-caps and sliding windows: SDPA's explicit path, the Triton kernel, flash-attn.
    # Each backend is tried and every difference reported, so one run says what fails where.
    from engine.demo.checkpoints import ensure_checkpoint

    folder = str(ensure_checkpoint(model_cache, preset="tiny-gemma2"))
    expected = _greedy(LLMEngine(EngineConfig(dtype="float32", model=folder, kv_cache_memory_gib=0.05)))
    failures = []
    for backend in ["sdpa", "triton"]:  # float32: the same tokens
        try:
            got = _greedy(LLMEngine(_small_pool_config(folder, "float32", backend)))
        except Exception as e:  # reported below with the backend's name
            failures.append(f"{backend}: {type(e).__name__}: {e}")
            continue
        failures += [
            f"{backend}: prompt {i} gave {g}, the CPU {x}"
            for i, (g, x) in enumerate(zip(got, expected, strict=True))
            if g != x
        ]
    assert failures == [], "\n".join(failures)
    if _has_flash():  # bfloat16 only: close to SDPA's logits, through the paged cache
        from engine.evaluation.quality import teacher_forced_logits

        logits = {}
        for backend in ["sdpa", "flash"]:
            engine = LLMEngine(_small_pool_config(folder, "bfloat16", backend))
            logits[backend] = teacher_forced_logits(engine, PROMPTS[1], window=len(PROMPTS[1]) - 1, chunk=16)
        torch.testing.assert_close(logits["flash"], logits["sdpa"], rtol=0.05, atol=0.05)


def _small_pool_config(folder: str, dtype: str, backend: str) -> EngineConfig:
    # A fixed pool: an engine sized from free GPU memory (gpu_memory_utilization) while an
    # earlier engine still holds its pool would find no memory left for its KV cache.
    return EngineConfig(model=folder, device="cuda", dtype=dtype, attention_backend=backend, num_kv_blocks=64)


def _has_flash() -> bool:
    from engine.layers.attention_backends import flash_attn_available

    return flash_attn_available()
