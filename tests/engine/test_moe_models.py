"""Mixture-of-experts families (Mixtral, Qwen3-MoE, GPT-OSS) give Transformers' logits and tokens.

Tiny random checkpoints (engine.demo.presets: 2 layers, 8 experts): the greedy batch mixes
prompt lengths and runs with a KV pool too small for it (preemption) and a 32-token step
budget (chunked prefill), as the dense families' tests do (test_model_families).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from engine.executor.cuda_graphs import is_capturable
from engine.loader.weights import build_model
from tests.engine.test_model_families import GREEDY, SMALL_KV, SMALL_POOL, _generate, _prompts

MOE_PRESETS = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-gpt-oss"]


@pytest.fixture(scope="module", params=MOE_PRESETS)
def moe_family(request, model_cache):
    folder = ensure_checkpoint(model_cache, preset=request.param)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, reference


def test_moe_logits_match_transformers_at_every_position(moe_family):
    folder, reference = moe_family
    prompt = _prompts(512, lengths=[80])[0]  # past the sliding windows and GPT-OSS's 64-token YaRN base
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
    model = LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_POOL)).runner.model
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_moe_greedy_tokens_match_generate_under_preemption_and_chunked_prefill(moe_family):
    folder, reference = moe_family
    prompts = _prompts(512)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_KV))
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [_generate(reference, p) for p in prompts]
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_moe_models_decode_eagerly_not_as_cuda_graphs(model_cache):
    # the experts' matmuls read each expert's token count on the host: a graph cannot replay that
    moe = build_model(ensure_checkpoint(model_cache, preset="tiny-mixtral"), torch.float32, "cpu")
    dense = build_model(ensure_checkpoint(model_cache, preset="tiny-qwen3"), torch.float32, "cpu")
    assert not is_capturable(moe) and is_capturable(dense)
