"""Compression on CUDA: bitsandbytes kernels, FP8 weights through torch._scaled_mm, 2:4 sparse kernels.

Not yet run on a GPU (none was available when they were written): the bounds come from
CPU measurements (tests/engine/test_quantization.py) and, for FP8, from the same layer code
run through torch._scaled_mm's CPU kernel with the device check bypassed: agreement 0.761 /
KL 0.0055 (float32 activations) and 0.753 / 0.0059 (bfloat16) against the float32 model on
the tiny checkpoint. The bounds leave room for the GPU kernels' own rounding. FP8 experts
(tiny-mixtral, same bounds): 0.898 / 0.0004 on the CPU the same way (bfloat16, 1,024 positions).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.compress import prune_checkpoint
from engine.demo.checkpoints import ensure_checkpoint
from engine.evaluation.quality import compare, targets_for, teacher_forced_logits
from engine.quant.fp8 import MIN_CAPABILITY

pytestmark = pytest.mark.gpu

TEXT = Path(__file__).resolve().parents[2] / "loadtest" / "data" / "coriolanus.txt"


def _engine(folder, **options) -> LLMEngine:
    # A fixed small pool: several engines share the GPU in this module.
    # float32 unless the test names a dtype (fp8 weights run in bfloat16)
    options = {"dtype": "float32", **options}
    config = EngineConfig(
        model=str(folder), device="cuda", attention_backend="sdpa", num_kv_blocks=64, **options
    )
    return LLMEngine(config)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    ids = engine.tokenizer.encode(TEXT.read_text())[:2049]
    return ids, teacher_forced_logits(engine, ids)


def _report(engine, reference):
    ids, ref_logits = reference
    return compare(ref_logits, teacher_forced_logits(engine, ids), targets_for(ids))


@pytest.mark.parametrize(("mode", "min_agreement", "max_kl"), [("int8", 0.85, 0.002), ("nf4", 0.20, 0.15)])
def test_bitsandbytes_modes_on_cuda_stay_within_the_cpu_bounds(
    tiny_checkpoint, reference, mode, min_agreement, max_kl
):
    engine = _engine(tiny_checkpoint, quantization=mode)
    assert engine.runner.model.model.layers[0].mlp.down_proj.bnb_linear.weight.device.type == "cuda"
    report = _report(engine, reference)
    assert report.greedy_agreement >= min_agreement and report.kl_divergence <= max_kl, report


def test_fp8_weights_run_through_scaled_mm_within_bounds(tiny_checkpoint, reference):
    if torch.cuda.get_device_capability() < MIN_CAPABILITY:
        pytest.skip(f"fp8 needs compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()}")
    engine = _engine(tiny_checkpoint, quantization="fp8", dtype="bfloat16")
    layer = engine.runner.model.model.layers[0].mlp.down_proj
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_fp8.device.type == "cuda"
    report = _report(engine, reference)
    assert report.greedy_agreement >= 0.6 and report.kl_divergence <= 0.015, report
    out = engine.generate(["The river"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_fp8_experts_of_a_mixtral_run_through_scaled_mm_within_the_dense_bounds(model_cache):
    if torch.cuda.get_device_capability() < MIN_CAPABILITY:
        pytest.skip(f"fp8 needs compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()}")
    folder = ensure_checkpoint(model_cache, preset="tiny-mixtral")
    reference = _engine(folder)
    ids = reference.tokenizer.encode(TEXT.read_text())[:1025]
    window = 128  # the preset has 256 positions
    ref_logits = teacher_forced_logits(reference, ids, window)
    engine = _engine(folder, quantization="fp8", dtype="bfloat16")
    experts = [m for m in engine.runner.model.modules() if getattr(m, "is_moe_experts", False)]
    assert experts and all(e.quant_method.name == "fp8" and e.use_triton is False for e in experts)
    weight = experts[0].gate_up_proj_experts[0].weight_fp8
    assert weight.dtype == torch.float8_e4m3fn and weight.device.type == "cuda"
    report = compare(ref_logits, teacher_forced_logits(engine, ids, window), targets_for(ids, window))
    assert report.greedy_agreement >= 0.6 and report.kl_divergence <= 0.015, report
    out = engine.generate(["The river"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_fp8_kv_cache_on_cuda_stays_within_the_cpu_bounds(tiny_checkpoint, reference):
    engine = _engine(tiny_checkpoint, kv_cache_dtype="fp8")
    assert engine.attention_backend == "sdpa" and engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    report = _report(engine, reference)
    assert report.greedy_agreement >= 0.85 and report.kl_divergence <= 0.002, report


def test_pruned_checkpoint_runs_semi_structured_sparse_kernels_and_matches_dense(tiny_checkpoint, tmp_path):
    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_checkpoint, pruned)
    dense = tmp_path / "dense"  # the same pruned weights without the marker: plain dense kernels
    shutil.copytree(pruned, dense)
    config = json.loads((dense / "config.json").read_text())
    del config["sluice_sparsity"]
    (dense / "config.json").write_text(json.dumps(config))

    sparse_engine = _engine(pruned, dtype="float16")
    layer = sparse_engine.runner.model.model.layers[0]
    # qkv [384, 256], o [256, 256], gate_up [1376, 256] tile; down_proj's 688 inputs may not.
    assert layer.self_attn.qkv_proj.is_sparse24 and layer.self_attn.o_proj.is_sparse24
    assert layer.mlp.gate_up_proj.is_sparse24
    dense_engine = _engine(dense, dtype="float16")
    ids = sparse_engine.tokenizer.encode(TEXT.read_text())[:1025]
    report = compare(
        teacher_forced_logits(dense_engine, ids), teacher_forced_logits(sparse_engine, ids), targets_for(ids)
    )
    # Same weights, same dtype: only the kernels' summation order differs.
    assert report.kl_divergence <= 1e-3 and report.greedy_agreement >= 0.9, report
