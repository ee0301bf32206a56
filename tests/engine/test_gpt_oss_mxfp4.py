"""GPT-OSS's MXFP4 experts kept packed where the Triton MoE kernel runs, dequantised at load elsewhere.

On CPU the kernel runs only under Triton's interpreter: the packed engine runs in a fresh
interpreter process (tests.engine.triton_interpreted), the dequantised one in this process.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from engine import EngineConfig, LLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from engine.distributed import parallel_state as ps
from engine.layers.moe import FusedMoE
from engine.models import gpt_oss
from engine.quant import mxfp4
from tests.engine.test_model_families import GREEDY, SMALL_POOL, _prompts
from tests.engine.test_moe_checkpoints import _mxfp4_and_dequantised
from tests.engine.triton_interpreted import run_interpreted

LENGTHS = [3, 40, 17]
_SHAPES = [("gate_up_proj", 128, 64), ("down_proj", 64, 64)]  # (name, out, in) with H = I = 64


def _engine_report(engine: LLMEngine) -> dict:
    """Greedy tokens of the prompts, whether every expert layer is packed, its weights' elements and bytes."""
    experts = [m for m in engine.runner.model.modules() if isinstance(m, FusedMoE)]
    weights = [p for m in experts for n, p in m.named_parameters() if not n.endswith("_bias")]
    outputs = engine.generate(_prompts(512, lengths=LENGTHS), GREEDY, use_tqdm=False)
    return {
        "tokens": [o.token_ids for o in outputs],
        "packed": [m.is_mxfp4 for m in experts],
        "bytes": sum(p.numel() * p.element_size() for p in weights),
        "elements": sum(p.numel() for p in weights),
    }


@pytest.mark.slow
def test_packed_mxfp4_engine_under_the_interpreter_gives_the_dequantised_load_s_tokens(model_cache, tmp_path):
    packed, _ = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    out = run_interpreted(
        f"""
        import json
        from engine import EngineConfig, LLMEngine
        from tests.engine.test_gpt_oss_mxfp4 import SMALL_POOL, _engine_report
        engine = LLMEngine(EngineConfig(dtype="float32", model={str(packed)!r}, **SMALL_POOL))
        print(json.dumps(_engine_report(engine)))
        """,
        timeout=120,
    )
    interpreted = json.loads(out.splitlines()[-1])
    dequantised = _engine_report(LLMEngine(EngineConfig(dtype="float32", model=str(packed), **SMALL_POOL)))
    assert interpreted["packed"] == [True, True] and dequantised["packed"] == [False, False]
    assert interpreted["tokens"] == dequantised["tokens"]
    # packed: 4.25 bits a weight, against 16 for the same experts in bfloat16
    assert interpreted["bytes"] / (dequantised["elements"] * 2) == 4.25 / 16


def test_mxfp4_experts_are_dequantised_at_load_where_the_kernel_does_not_run(model_cache, tmp_path, caplog):
    packed, _ = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    caplog.set_level(logging.INFO, logger=gpt_oss.__name__)
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(packed), **SMALL_POOL))
    experts = [m for m in engine.runner.model.modules() if isinstance(m, FusedMoE)]
    assert [m.gate_up_proj.dtype for m in experts] == [torch.float32] * 2
    assert (
        "MXFP4 experts of 2 layers dequantised at load, the Triton MoE kernel does not run on cpu"
        in caplog.text
    )


@pytest.mark.parametrize(("intermediate", "packed"), [(64, True), (32, False)])
def test_mxfp4_stays_packed_under_tensor_parallelism_only_if_shards_hold_whole_blocks(
    monkeypatch, intermediate, packed
):
    monkeypatch.setattr(gpt_oss, "triton_kernel_runs_on", lambda device: True)
    config = SimpleNamespace(hidden_size=64, intermediate_size=intermediate)
    monkeypatch.setattr(ps, "_state", ps.ParallelState(0, 2, tp_size=2))
    keep, why = gpt_oss.mxfp4_layout(config, torch.device("cuda"))
    assert keep == packed
    assert packed or "share of the intermediate size (16) is not a multiple of 32" in why
    monkeypatch.setattr(ps, "_state", ps.ParallelState(0, 2, tp_size=2, expert_parallel=True))
    assert gpt_oss.mxfp4_layout(config, torch.device("cuda"))[0]  # whole experts: nothing split


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_each_rank_s_packed_shard_holds_what_its_dequantised_shard_holds(monkeypatch, expert_parallel):
    torch.manual_seed(0)
    config = SimpleNamespace(
        num_local_experts=4, hidden_size=64, intermediate_size=64, swiglu_alpha=1.702, swiglu_limit=7.0
    )
    # checkpoint layout: gate/up rows interleaved, [E, out, in / 32, 16] and [E, out, in / 32]
    tensors = {name: mxfp4.quantize(torch.randn(4, rows, cols)) for name, rows, cols in _SHAPES}
    for rank in range(2):
        monkeypatch.setattr(
            ps, "_state", ps.ParallelState(rank, 2, tp_size=2, expert_parallel=expert_parallel)
        )
        dense, packed = gpt_oss.GptOssExperts(config), gpt_oss.GptOssExperts(config, packed=True)
        for name, (blocks, scales) in tensors.items():
            dense.weight_loader(getattr(dense, name), blocks, "blocks")
            dense.weight_loader(getattr(dense, name), scales, "scales")
            packed.weight_loader(getattr(packed, f"{name}_blocks"), blocks)
            packed.weight_loader(getattr(packed, f"{name}_scales"), scales)
            restored = mxfp4.dequantize(getattr(packed, f"{name}_blocks"), getattr(packed, f"{name}_scales"))
            assert torch.equal(restored, getattr(dense, name).data), (rank, name)


def test_quantising_packed_experts_again_is_refused_by_name():
    from engine.quant.bnb import BnbInt8LinearMethod
    from engine.quant.experts import QuantizedExpertsMethod

    packed = FusedMoE(4, 64, 64, torch.nn.functional.silu, mxfp4=True)  # a CPU build under the interpreter
    with pytest.raises(
        ValueError, match="MXFP4 experts kept packed for the Triton kernel cannot be quantised"
    ):
        QuantizedExpertsMethod(BnbInt8LinearMethod(6.0)).process_weights_after_loading(packed)


def test_packed_mxfp4_tensor_that_is_not_uint8_is_a_value_error():
    config = SimpleNamespace(
        num_local_experts=4, hidden_size=64, intermediate_size=64, swiglu_alpha=1.702, swiglu_limit=7.0
    )
    packed = gpt_oss.GptOssExperts(config, packed=True)
    with pytest.raises(ValueError, match=r"is torch.float32, expected uint8 \(MXFP4 blocks and scales\)"):
        packed.weight_loader(packed.down_proj_scales, torch.zeros(4, 64, 2))


@pytest.mark.gpu
def test_mxfp4_gpt_oss_on_cuda_keeps_experts_packed_and_gives_the_cpu_dequantised_tokens(
    model_cache, tmp_path
):
    packed, _ = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    on_cpu = _engine_report(LLMEngine(EngineConfig(dtype="float32", model=str(packed), **SMALL_POOL)))
    on_cuda = _engine_report(LLMEngine(EngineConfig(dtype="float32", model=str(packed), device="cuda")))
    assert on_cuda["packed"] == [True, True]
    assert on_cuda["tokens"] == on_cpu["tokens"]
