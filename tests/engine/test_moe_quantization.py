"""Quantised experts: bitsandbytes int8 / NF4 / FP4, FP8 and W8A8 per expert for Mixtral, Qwen3-MoE and GPT-OSS.

Quality is measured as for the dense quantised models (test_quantization): teacher-forced
next-token statistics against the same engine in float32, with the dense tests' bounds, here
over 512 positions of loadtest/data/coriolanus.txt on each tiny MoE preset. Measured (1,024
positions, bitsandbytes 0.50.2, CPU): int8 agreement 0.97-0.98 and KL 3-5e-5; nf4 0.65-0.75 /
0.0015-0.004; fp4 0.65-0.72 / 0.003-0.005. The `gpu` test (bitsandbytes' CUDA kernels per
expert) has not yet run on a GPU: its bounds are the CPU ones. FP8 needs CUDA (cc >= 8.9) in
the engine; here its per-expert torch._scaled_mm path runs on the CPU kernel with only the
engine's device check bypassed (test_gpu_quantization has the CUDA run).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.layers.moe as moe_module
import engine.quant.plan as plan_module
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.demo.checkpoints import ensure_checkpoint
from engine.evaluation.quality import compare, targets_for, teacher_forced_logits
from engine.layers.packed_linear import FLOAT_METHOD_NAMES
from engine.loader.weights import build_model
from engine.quant import QuantizationError
from engine.quant.experts import QuantizedExpertsMethod
from engine.quant.plan import QuantPlan, finalize_model, prepare_model
from tests.engine.test_quantization import BOUNDS

TEXT = Path(__file__).resolve().parents[2] / "loadtest" / "data" / "coriolanus.txt"
WINDOW = 128  # GPT-OSS's tiny preset has 256 positions
NUM_POSITIONS = 512
MOE_PRESETS = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-gpt-oss"]
# the dense tests' bound on the quantised linear weights' share of their float32 bytes; fp8: one
# byte of float32's four, plus a float32 scale per row of 64 or 32 inputs (measured 0.27)
MAX_SHARE = {"int8": 0.30, "nf4": 0.16, "fp4": 0.16, "fp8": 0.30, "w8a8": 0.30}


def _engine(folder: Path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(folder), kv_cache_memory_gib=0.05, **options))


def _experts(engine: LLMEngine) -> list[torch.nn.Module]:
    return [m for m in engine.runner.model.modules() if getattr(m, "is_moe_experts", False)]


@pytest.fixture(scope="module", params=MOE_PRESETS)
def moe_reference(request, model_cache):
    folder = ensure_checkpoint(model_cache, preset=request.param)
    engine = _engine(folder)
    ids = engine.tokenizer.encode(TEXT.read_text())[: NUM_POSITIONS + 1]
    return folder, ids, teacher_forced_logits(engine, ids, WINDOW)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4", "w8a8"])
def test_quantised_moe_model_generates_within_the_dense_bounds_of_float32(moe_reference, mode):
    folder, ids, ref_logits = moe_reference
    options, min_agreement, max_kl, max_log_ppl_ratio = BOUNDS[mode]
    engine = _engine(folder, **options)
    outputs = engine.generate(
        ["The river", "Before we proceed"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in outputs] == [8, 8]
    report = compare(ref_logits, teacher_forced_logits(engine, ids, WINDOW), targets_for(ids, WINDOW))
    assert report.num_positions == NUM_POSITIONS
    assert report.greedy_agreement >= min_agreement, report
    assert report.kl_divergence <= max_kl, report
    assert abs(torch.tensor(report.perplexity_ratio).log()) <= max_log_ppl_ratio, report


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Lets the engine build an fp8 model on the CPU: only its device check is bypassed. This torch
    has a CPU kernel for torch._scaled_mm, so the fp8 code path itself runs here as on CUDA."""
    monkeypatch.setattr(plan_module, "check_fp8_supported", lambda device: None)


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "fp8", "w8a8"])
def test_quantised_experts_take_a_fraction_of_their_float32_bytes(model_cache, fp8_on_cpu, mode):
    folder = ensure_checkpoint(model_cache, preset="tiny-mixtral")
    float_experts = _experts(_engine(folder))
    float_bytes = sum(e.gate_up_proj.nbytes + e.down_proj.nbytes for e in float_experts)
    quantised = _experts(_engine(folder, quantization=mode))
    assert all(e.gate_up_proj is None and e.down_proj is None for e in quantised)  # float copies dropped
    stored = sum(e.quant_method.weight_bytes(e) for e in quantised)  # weights, scales, 4-bit code books
    held = sum(t.nbytes for e in quantised for t in [*e.parameters(), *e.buffers()])  # no biases here
    assert held <= stored <= MAX_SHARE[mode] * float_bytes


def test_router_stays_float_while_experts_and_dense_layers_are_quantised(model_cache):
    engine = _engine(ensure_checkpoint(model_cache, preset="tiny-qwen3-moe"), quantization="nf4")
    layer = engine.runner.model.model.layers[0]
    assert layer.mlp.gate.quant_method.name in FLOAT_METHOD_NAMES
    assert layer.mlp.experts.quant_method.name == "nf4"
    assert layer.self_attn.qkv_proj.quant_method.name == "nf4"


def test_quantisation_skip_modules_keep_the_experts_float(model_cache):
    engine = _engine(
        ensure_checkpoint(model_cache, preset="tiny-mixtral"),
        quantization="int8",
        quantization_skip_modules=("experts",),
    )
    experts = _experts(engine)
    assert all(e.quant_method is None and e.gate_up_proj.dtype == torch.float32 for e in experts)
    assert engine.runner.model.model.layers[0].self_attn.o_proj.quant_method.name == "int8"


@pytest.mark.parametrize(
    ("plan", "what"),
    [
        (QuantPlan(mode="nf4", prequantized=True), r"a pre-quantised bitsandbytes \(nf4\) checkpoint"),
        (QuantPlan(sparse24=True), "a 2:4-pruned checkpoint"),
        (QuantPlan(mode="w8a8", prequantized=True), "a compressed-tensors W8A8 checkpoint"),
    ],
)
def test_unsupported_quantisation_of_an_moe_model_is_refused_by_name(model_cache, plan, what):
    model = build_model(ensure_checkpoint(model_cache, preset="tiny-mixtral"), torch.float32, "cpu")
    with pytest.raises(QuantizationError, match=f"{what} is not supported for mixture-of-experts models"):
        prepare_model(model, plan)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _experts_rank(monkeypatch, rank: int, size: int, weights: tuple, mode: str | None, ep: bool = False):
    monkeypatch.setattr(moe_module, "get_tp_rank", lambda: rank)
    monkeypatch.setattr(moe_module, "get_tp_size", lambda: size)
    monkeypatch.setattr(moe_module, "is_expert_parallel", lambda: ep)
    experts = moe_module.FusedMoE(4, 64, 128, _swiglu)
    experts.weight_loader(experts.gate_up_proj, weights[0])
    experts.weight_loader(experts.down_proj, weights[1])
    if mode is not None:
        QuantizedExpertsMethod(QuantPlan(mode=mode).make_method()).process_weights_after_loading(experts)
    return experts.to("cpu")  # bitsandbytes quantises here


# two quantised matmuls in series (gate_up, then down): measured 0.015-0.021 (int8), 0.16-0.18 (nf4),
# 0.062-0.063 (fp8: e4m3's 3 mantissa bits round each weight and activation by up to 2^-4, ~3.6%
# RMS; one fp8 matmul measured 3.7% in test_quantization, two in series ~sqrt(2) times that)
def _four_experts_and_six_tokens():
    """Stacked weights of 4 experts (gate_up [4, 256, 64], down [4, 64, 128]), 6 tokens, their top-2 routing."""
    generator = torch.Generator().manual_seed(0)
    weights = (
        torch.randn(4, 256, 64, generator=generator) * 0.05,
        torch.randn(4, 64, 128, generator=generator) * 0.05,
    )
    x = torch.randn(6, 64, generator=generator)
    routing = (
        torch.rand(6, 2, generator=generator),
        torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]]),
    )
    return weights, x, routing


@pytest.mark.parametrize(("mode", "max_relative_error"), [("int8", 0.04), ("nf4", 0.25), ("fp8", 0.1)])
def test_tensor_parallel_ranks_quantise_their_own_expert_shards(monkeypatch, mode, max_relative_error):
    # Ranks simulated in one process; the sum of their outputs is what the all-reduce would give.
    # Each rank quantises its shard: as close to the float experts as the whole quantised layer.
    weights, x, routing = _four_experts_and_six_tokens()
    with torch.inference_mode():
        expected = moe_module.fused_experts(_experts_rank(monkeypatch, 0, 1, weights, None), x, *routing)
        whole = moe_module.fused_experts(_experts_rank(monkeypatch, 0, 1, weights, mode), x, *routing)
        ranks = [_experts_rank(monkeypatch, r, 2, weights, mode) for r in range(2)]
        total = sum(moe_module.fused_experts(e, x, *routing) for e in ranks)
    assert all(e.gate_up_proj_experts[0].out_features == 128 for e in ranks)  # each rank's half of 2I
    error, whole_error = ((y - expected).norm() / expected.norm() for y in (total, whole))
    assert whole_error <= max_relative_error and error <= 1.25 * whole_error


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp8"])
def test_expert_parallel_ranks_quantise_only_their_own_whole_experts(monkeypatch, mode):
    # Each rank quantises the experts it holds, whole: the same quantised experts as one process,
    # so the ranks' outputs sum to the whole quantised layer's (up to the order of the sum).
    weights, x, routing = _four_experts_and_six_tokens()
    with torch.inference_mode():
        whole = moe_module.fused_experts(_experts_rank(monkeypatch, 0, 1, weights, mode), x, *routing)
        ranks = [_experts_rank(monkeypatch, r, 2, weights, mode, ep=True) for r in range(2)]
        total = sum(moe_module.fused_experts(e, x, *routing) for e in ranks)
    assert [len(e.gate_up_proj_experts) for e in ranks] == [2, 2]  # experts 0-1 and 2-3
    assert all(e.gate_up_proj_experts[0].out_features == 256 for e in ranks)  # whole 2I rows
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantised_experts_run_on_cuda_within_the_cpu_bounds(model_cache, mode):
    folder = ensure_checkpoint(model_cache, preset="tiny-mixtral")
    cuda = {"device": "cuda", "attention_backend": "sdpa", "num_kv_blocks": 64}
    reference = LLMEngine(EngineConfig(dtype="float32", model=str(folder), **cuda))
    ids = reference.tokenizer.encode(TEXT.read_text())[: NUM_POSITIONS + 1]
    ref_logits = teacher_forced_logits(reference, ids, WINDOW)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(folder), quantization=mode, **cuda))
    experts = _experts(engine)[0]
    assert experts.gate_up_proj_experts[0].bnb_linear.weight.device.type == "cuda"
    _, min_agreement, max_kl, _ = BOUNDS[mode]
    report = compare(ref_logits, teacher_forced_logits(engine, ids, WINDOW), targets_for(ids, WINDOW))
    assert report.greedy_agreement >= min_agreement and report.kl_divergence <= max_kl, report


def test_fp8_experts_are_refused_off_cuda_as_dense_layers_are(model_cache):
    with pytest.raises(QuantizationError, match="quantization 'fp8' needs a CUDA GPU"):
        _engine(ensure_checkpoint(model_cache, preset="tiny-mixtral"), quantization="fp8")


# Measured (CPU, torch 2.15's torch._scaled_mm, 512 and 1,024 positions; float32 and bfloat16
# activations): agreement 0.89-0.92, KL 2-4e-4, |log perplexity ratio| <= 0.003 on all three
# presets. The bounds keep a margin and stay far from a broken expert (agreement ~1/512, KL > 1).
@pytest.mark.slow
def test_fp8_experts_run_scaled_mm_per_expert_close_to_float32(moe_reference, fp8_on_cpu):
    folder, ids, ref_logits = moe_reference
    engine = _engine(folder, quantization="fp8")
    for experts in _experts(engine):
        assert experts.quant_method.name == "fp8" and experts.use_triton is False
        assert experts.gate_up_proj_experts[0].weight_fp8.dtype == torch.float8_e4m3fn
    routers = [m.gate for m in engine.runner.model.modules() if isinstance(m, moe_module.SparseMoeBlock)]
    assert routers and all(router.quant_method.name in FLOAT_METHOD_NAMES for router in routers)
    outputs = engine.generate(
        ["The river", "Before we proceed"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in outputs] == [8, 8]
    report = compare(ref_logits, teacher_forced_logits(engine, ids, WINDOW), targets_for(ids, WINDOW))
    assert report.greedy_agreement >= 0.8 and report.kl_divergence <= 0.002, report
    assert abs(torch.tensor(report.perplexity_ratio).log()) <= 0.01, report


def _two_moe_layers(monkeypatch, intermediate_sizes: tuple[int, int]) -> torch.nn.Module:
    # layers.{0,1}.mlp.experts, float: 4 experts of hidden size 64 each
    _experts_rank(monkeypatch, 0, 1, (torch.zeros(4, 256, 64), torch.zeros(4, 64, 128)), None)  # one rank
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for size in intermediate_sizes:
        layer = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        layer.mlp.experts = moe_module.FusedMoE(4, 64, size, _swiglu)
        layer.mlp.experts.gate_up_proj.data.normal_()
        layer.mlp.experts.down_proj.data.normal_()
        model.layers.append(layer)
    return model


def test_fp8_experts_whose_sizes_do_not_tile_are_refused_naming_the_layer(monkeypatch):
    model = _two_moe_layers(monkeypatch, (32, 24))  # layer 1's down_proj [64, 24]: 24 is no multiple of 16
    with pytest.raises(
        QuantizationError,
        match=r"layers\.1\.mlp\.experts: down_proj of each expert: fp8 needs linear layers whose sizes "
        r"are multiples of 16, got \[64, 24\].*quantization_skip_modules \(these experts: 'layers\.1\.mlp\.experts'",
    ):
        finalize_model(model, QuantPlan(mode="fp8"), torch.device("cpu"))


def test_fp8_experts_listed_in_quantisation_skip_modules_stay_float(monkeypatch):
    model = _two_moe_layers(monkeypatch, (32, 24))
    finalize_model(model, QuantPlan(mode="fp8", skip_modules=("layers.1.mlp.experts",)), torch.device("cpu"))
    quantised, skipped = (layer.mlp.experts for layer in model.layers)
    assert quantised.quant_method.name == "fp8"
    assert quantised.down_proj_experts[3].weight_fp8.shape == (64, 32)  # [H, I] of expert 3
    assert skipped.quant_method is None and skipped.gate_up_proj.dtype == torch.float32
