"""Every model family (engine.models) gives Transformers' logits and greedy tokens.

One tiny random checkpoint per configuration (engine.demo.presets, plus this module's second
Mistral and Qwen2): GQA and MQA, tied and untied embeddings, biases, sliding windows,
soft-caps, q/k norms, local/global RoPE, fused projections, partial rotary, YaRN, dynamic
NTK and LongRoPE, a multimodal wrapper.
The greedy batch mixes prompt lengths (one decodes past the 64-token original context of
the YaRN and dynamic presets) and runs with a KV pool too small for it (preemption) and a
32-token step budget (chunked prefill), with prefix caching on.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputs
from engine.demo.checkpoints import ensure_checkpoint
from engine.demo.presets import PRESETS
from engine.evaluation.quality import compare, teacher_forced_logits
from engine.loader.weights import build_model

FAMILY_PRESETS = [
    "tiny-qwen3",
    "tiny-qwen3-yarn",
    "tiny-llama-dynamic",
    "tiny-gemma2",
    "tiny-gemma2-mqa",
    "tiny-gemma3",
    "tiny-gemma3-mm",
    "tiny-phi3",
    "tiny-phi4-mini",
    "test-mistral-mqa-tied",
    "test-qwen2-mqa-untied",
]
# Second configurations of the families engine.demo.presets has one preset of (hidden 64, MQA,
# the other tying, no window), registered for this module only.
TEST_PRESETS = {
    "test-mistral-mqa-tied": dataclasses.replace(
        PRESETS["tiny-qwen3"],
        architecture="MistralForCausalLM",
        num_key_value_heads=1,
        options={"tie_word_embeddings": True, "sliding_window": None},
    ),
    "test-qwen2-mqa-untied": dataclasses.replace(
        PRESETS["tiny-qwen3"],
        architecture="Qwen2ForCausalLM",
        num_key_value_heads=1,
        options={"tie_word_embeddings": False},
    ),
}
MAX_TOKENS = 12
# 24 blocks of 4 tokens cannot hold the batch: sequences are preempted and recomputed
SMALL_KV = {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 32}
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SMALL_POOL = {"kv_cache_memory_gib": 0.05}


@dataclass
class Family:
    preset: str
    folder: Path
    reference: AutoModelForCausalLM  # Transformers' model of the checkpoint, float32
    prompts: list[list[int]]
    expected: list[list[int]]  # each prompt's greedy tokens from Transformers' generate(), alone


@pytest.fixture(scope="module")
def test_presets():
    with pytest.MonkeyPatch.context() as patch:
        for name, preset in TEST_PRESETS.items():
            patch.setitem(PRESETS, name, preset)
        yield


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def family(request, model_cache, test_presets) -> Family:
    folder = ensure_checkpoint(model_cache, preset=request.param)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = _prompts(reference.config.get_text_config().vocab_size)
    return Family(request.param, folder, reference, prompts, [_generate(reference, p) for p in prompts])


def test_logits_match_transformers_at_every_position(family):
    prompt = family.prompts[3]  # 40 tokens: past every sliding window
    with torch.inference_mode():
        theirs = family.reference(torch.tensor([prompt])).logits[0]
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(family.folder), **SMALL_POOL))
    model = engine.runner.model
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt))))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_bfloat16_gemma_logits_equal_transformers(model_cache, preset):
    # Gemma's norms compute in float32 and cast after the (1 + weight), and its embedding scale
    # is rounded to the weights' dtype: bfloat16 shows whether both follow Transformers.
    folder = ensure_checkpoint(model_cache, preset=preset)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = build_model(folder, torch.bfloat16, "cpu")
    prompt = torch.tensor(_prompts(512)[3])
    with torch.inference_mode():
        theirs = reference(prompt[None]).logits[0]
        ours = model.compute_logits(model(prompt, torch.arange(len(prompt))))
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)


def test_greedy_tokens_match_generate_under_preemption_and_chunked_prefill(family):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(family.folder), **SMALL_KV))
    outputs = engine.generate(family.prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outputs] == family.expected
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert engine.block_manager.stats.hit_tokens > 0  # preempted sequences came back on cached blocks
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_choice_request_answers_one_of_its_choices(family):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(family.folder), **SMALL_POOL))
    params = SamplingParams(
        temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputs(choice=["yes", "no", "maybe"])
    )
    [output] = engine.generate(["Is the river cold?"], params, use_tqdm=False)
    assert output.text in ("yes", "no", "maybe")
    assert sum(output.choice_probabilities.values()) == pytest.approx(1.0, abs=1e-4)


# Teacher-forced over 199 positions against the same engine in float32. Measured (bitsandbytes
# 0.50.2, CPU): int8 agreement 0.96 / 0.95, KL 9e-5 / 5e-5; nf4 0.56 / 0.006; fp4 0.38 / 0.021;
# fp8 KV 0.93 / 0.97, KL 1.5e-4 / 5e-5. A broken layer gives agreement ~1/512 and KL > 1.
@pytest.mark.parametrize(
    ("preset", "options", "min_agreement", "max_kl"),
    [
        ("tiny-gemma2", {"quantization": "int8"}, 0.85, 0.001),
        ("tiny-phi3", {"quantization": "int8"}, 0.85, 0.001),
        ("tiny-qwen3", {"quantization": "nf4"}, 0.3, 0.05),
        ("tiny-gemma3-mm", {"quantization": "fp4"}, 0.2, 0.1),
        ("tiny-gemma2", {"kv_cache_dtype": "fp8"}, 0.8, 0.002),
        ("tiny-qwen3-yarn", {"kv_cache_dtype": "fp8"}, 0.8, 0.002),
    ],
)
def test_compressed_family_stays_close_to_float32(model_cache, preset, options, min_agreement, max_kl):
    folder = ensure_checkpoint(model_cache, preset=preset)
    ids = _prompts(512, seed=1, lengths=[200])[0]
    reference = _all_logits(LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_POOL)), ids)
    compressed = LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_POOL, **options))
    report = compare(reference, _all_logits(compressed, ids), torch.tensor(ids[1:]))
    assert report.greedy_agreement >= min_agreement, report
    assert report.kl_divergence <= max_kl, report
    outputs = compressed.generate([ids[:20]], GREEDY, use_tqdm=False)
    assert len(outputs[0].token_ids) == MAX_TOKENS


def test_prequantised_phi3_with_fused_projections_equals_quantising_at_load(model_cache, tmp_path):
    from tests.engine.test_prequantized import _save_prequantised

    source = ensure_checkpoint(model_cache, preset="tiny-phi3")
    folder = _save_prequantised(source, tmp_path / "prequantised", "int8")
    at_load = LLMEngine(EngineConfig(dtype="float32", model=str(source), quantization="int8", **SMALL_POOL))
    prequantised = LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_POOL))
    layer = prequantised.runner.model.model.layers[0].self_attn.qkv_proj
    assert len(layer.bnb_shards) == 1  # the checkpoint's one fused projection
    prompts = _prompts(512, lengths=[5, 40])
    expected = [o.token_ids for o in at_load.generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.token_ids for o in prequantised.generate(prompts, GREEDY, use_tqdm=False)] == expected


def _prompts(vocab: int, seed: int = 0, lengths: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = lengths or [1, 3, 17, 40, 5, 64, 9, 33]  # mixed, several longer than a 16-token block
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in lengths]


def _generate(reference, prompt: list[int]) -> list[int]:
    # A fresh copy per prompt: dynamic NTK keeps state between generate() calls. EOS is an
    # ordinary token, as with ignore_eos (min_new_tokens would forbid it instead).
    model = copy.deepcopy(reference)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _all_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids) - 1, V] predicting ids[1:], through the engine's paged KV cache."""
    return teacher_forced_logits(engine, ids, window=len(ids) - 1)


def test_the_profiling_forward_keeps_positions_inside_a_short_models_rope_table(model_cache):
    # CUDA sizes the KV cache after a forward of the whole token budget; tiny-gemma2's context is
    # shorter than that budget, and a position past its RoPE table is a device-side assert there.
    folder = ensure_checkpoint(model_cache, preset="tiny-gemma2")
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(folder), kv_cache_memory_gib=0.05))
    table = min(
        m.cos_sin_cache.shape[0] for m in engine.runner.model.modules() if hasattr(m, "cos_sin_cache")
    )
    budget = engine.config.max_num_batched_tokens
    assert budget > table  # the case that failed on the H200
    positions = engine.runner._profile_positions(budget)
    assert positions.shape == (budget,) and int(positions.max()) < table
