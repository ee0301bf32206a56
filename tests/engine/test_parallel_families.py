"""Tensor and pipeline parallelism give one process's greedy tokens for every family.

TP=2 for each family (Llama's own layouts are test_parallel.py's), each with what its split
must get right: Gemma 2's soft-capped, sliding-window attention and GeGLU, Gemma 3's q/k norms
and local/global RoPE, Phi-3's fused qkv/gate_up checkpoint tensors split across ranks,
Phi-4-mini's partial rotary with its single KV head replicated, Qwen3's per-head q/k norms
(MQA, YaRN), Mistral's window, Qwen2's q/k/v biases; PP=2 for Gemma 3's multimodal wrapper
(sandwich norms, tied embedding on both stages, its checkpoint prefixes) and Phi-3 (fused
tensors of the other stage skipped). A tiny KV pool forces preemption.
"""

from __future__ import annotations

import random

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.demo.checkpoints import ensure_checkpoint

# enforce_eager: no compiled decode kernel to warm up in each process (half of a case's time);
# the compiled kernel under parallelism is test_parallel.py's.
SMALL_KV = {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 32, "enforce_eager": True}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "tp", "pp"),
    [
        pytest.param("tiny-gemma2", 2, 1, id="gemma2-tp2"),
        pytest.param("tiny-phi3", 2, 1, id="phi3-tp2"),
        pytest.param("tiny-qwen3-yarn", 2, 1, id="qwen3-mqa-tp2"),
        pytest.param("tiny-gemma3-mm", 1, 2, id="gemma3-multimodal-pp2"),
        pytest.param("tiny-gemma3", 2, 1, id="gemma3-tp2"),
        pytest.param("tiny-phi4-mini", 2, 1, id="phi4-mini-mqa-partial-rotary-tp2"),
        pytest.param("tiny-mistral", 2, 1, id="mistral-tp2"),
        pytest.param("tiny-qwen2", 2, 1, id="qwen2-tp2"),
        pytest.param("tiny-phi3", 1, 2, id="phi3-pp2"),
    ],
)
def test_parallel_engine_gives_one_process_s_tokens(model_cache, preset, tp, pp):
    folder = str(ensure_checkpoint(model_cache, preset=preset))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, 512) for _ in range(n - 1)] for n in [1, 3, 17, 40, 5, 64, 9, 33]]
    with LLMEngine(EngineConfig(dtype="float32", model=folder, **SMALL_KV)) as single:
        expected = [o.token_ids for o in single.generate(prompts, GREEDY, use_tqdm=False)]
    config = EngineConfig(
        dtype="float32", model=folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, **SMALL_KV
    )
    with LLMEngine(config) as engine:
        outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
