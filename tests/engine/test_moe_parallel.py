"""Mixture-of-experts models across ranks: expert parallelism and pipeline stages on CPU (gloo).

Expert parallelism (EngineConfig.expert_parallel) gives each tensor-parallel rank half the
experts, whole; pipeline parallelism gives each stage half the layers, experts and all. Both
must give one process's greedy tokens for a mixed batch that the KV pool forces to preempt.
"""

from __future__ import annotations

import pytest

from engine import EngineConfig, EngineConfigError, LLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from engine.distributed.layout import check_parallel_layout
from engine.layers.moe import FusedMoE
from tests.engine.test_model_families import GREEDY, SMALL_KV, _prompts

TINY_LAYOUT = {"num_attention_heads": 8, "intermediate_size": 64, "vocab_size": 512, "num_hidden_layers": 2}


def _tokens(folder, **options) -> tuple[list[list[int]], int, list[FusedMoE]]:
    """(greedy tokens of the mixed batch, preemptions, rank 0's expert layers) of an engine."""
    with LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_KV, **options)) as engine:
        outputs = engine.generate(_prompts(512), GREEDY, use_tqdm=False)
        experts = [m for m in engine.executor.runner.model.modules() if isinstance(m, FusedMoE)]
    return [o.token_ids for o in outputs], sum(o.metrics.num_preemptions for o in outputs), experts


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe", "tiny-gpt-oss"])
def test_expert_parallel_ranks_give_one_process_s_tokens(model_cache, preset):
    folder = ensure_checkpoint(model_cache, preset=preset)
    expected, _, _ = _tokens(folder)
    tokens, preemptions, experts = _tokens(folder, tensor_parallel_size=2, expert_parallel=True)
    assert tokens == expected and preemptions > 0
    # rank 0 holds experts 0..3 of 8, each with its whole intermediate dim
    assert {(e.expert_start, e.num_local_experts, e.down_proj.shape[0]) for e in experts} == {(0, 4, 4)}
    assert all(e.down_proj.shape[2] == e.intermediate_size for e in experts)


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [
        (
            {"num_local_experts": 6},
            r"expert_parallel: tensor_parallel_size=4 must divide the model's num_local_experts \(6\)",
        ),
        (
            {"num_experts": 6},
            r"expert_parallel: tensor_parallel_size=4 must divide the model's num_experts \(6\)",
        ),
        ({}, "expert_parallel needs a mixture-of-experts model"),
    ],
    ids=["mixtral-style", "qwen3-moe-style", "dense"],
)
def test_expert_parallel_layout_the_model_cannot_take_is_refused_by_name(hf_config, message):
    config = EngineConfig(tensor_parallel_size=4, expert_parallel=True)
    with pytest.raises(EngineConfigError, match=message):
        check_parallel_layout(config, {**TINY_LAYOUT, **hf_config})


def test_expert_parallel_must_be_a_boolean():
    with pytest.raises(EngineConfigError, match="expert_parallel must be true or false"):
        EngineConfig(expert_parallel="yes")


@pytest.mark.slow
def test_expert_parallel_ranks_quantising_their_own_experts_give_one_int8_process_s_tokens(model_cache):
    # attention stays float: its o_proj rows would be quantised in halves under tensor parallelism
    folder = ensure_checkpoint(model_cache, preset="tiny-mixtral")
    int8 = {"quantization": "int8", "quantization_skip_modules": ("self_attn",)}
    expected, _, _ = _tokens(folder, **int8)
    tokens, _, experts = _tokens(folder, tensor_parallel_size=2, expert_parallel=True, **int8)
    assert tokens == expected
    assert {len(e.gate_up_proj_experts) for e in experts} == {4}  # rank 0 quantised its 4 experts


@pytest.mark.slow
def test_pipeline_stages_of_a_mixtral_give_one_process_s_tokens(model_cache):
    # each stage holds one of the two layers, with its router and all its experts
    folder = ensure_checkpoint(model_cache, preset="tiny-mixtral")
    expected, _, _ = _tokens(folder)
    tokens, preemptions, experts = _tokens(folder, pipeline_parallel_size=2)
    assert tokens == expected and preemptions > 0
    assert len(experts) == 1 and experts[0].num_local_experts == 8
