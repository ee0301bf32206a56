"""The grouped-GEMM Triton MoE kernel (engine.kernels.triton_moe) equals fused_experts.

On CPU the kernel runs under Triton's interpreter, which must be switched on before triton is
imported: each check runs in a fresh interpreter process with TRITON_INTERPRET=1 (as in
test_triton_decode.py). The `gpu` test runs the compiled kernel on CUDA.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from engine.layers.moe import FusedMoE, fused_experts, select_experts
from tests.engine.triton_interpreted import run_interpreted

# E experts, top-2, H = 64, I = 48; (E, T): T * k = 66 > 16 * E takes the BLOCK_M = 64 tiles
CASES = "[(8, 1), (8, 5), (4, 33)]"

SETUP = """
import torch
from engine.layers.moe import FusedMoE, fused_experts, select_experts
from engine.kernels.triton_moe import triton_fused_experts

def swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up

def experts(num_experts, bias, dtype, hidden=64, intermediate=48):
    layer = FusedMoE(num_experts, hidden, intermediate, swiglu, bias=bias)
    for param in layer.parameters():
        param.data.normal_(0, 0.1)
    return layer.to(dtype)

def routed(num_tokens, num_experts, dtype, hidden=64):
    weights, ids = select_experts(torch.randn(num_tokens, num_experts), 2, renormalize=True)
    return torch.randn(num_tokens, hidden, dtype=dtype), weights, ids
"""


def _run_interpreted(code: str) -> str:
    return run_interpreted(textwrap.dedent(SETUP) + textwrap.dedent(code), timeout=300)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every interpreter check in one process (its start-up is most of the time): name -> errors."""
    out = _run_interpreted(
        f"""
        import json
        torch.manual_seed(0)
        errors = {{"float32": [], "bfloat16": []}}
        for dtype in errors:
            for num_experts, num_tokens in {CASES}:
                for bias in (False, True):
                    layer = experts(num_experts, bias, getattr(torch, dtype))
                    x, weights, ids = routed(num_tokens, num_experts, getattr(torch, dtype))
                    expected = fused_experts(layer, x, weights, ids).float()
                    got = triton_fused_experts(layer, x, weights, ids).float()
                    errors[dtype].append(((got - expected).abs().max() / expected.abs().max()).item())
        layer = experts(4, True, torch.float32)
        x, weights, ids = routed(5, 4, torch.float32)
        rank_0 = triton_fused_experts(layer, x, weights, ids)
        layer.tp_rank = 1
        rank_1 = triton_fused_experts(layer, x, weights, ids)
        errors["rank 1"] = [(rank_1 - fused_experts(layer, x, weights, ids)).abs().max().item()]
        errors["rank 0 - rank 1"] = [(rank_0 - rank_1).abs().max().item()]
        errors["no tokens"] = [triton_fused_experts(layer, x[:0], weights[:0], ids[:0]).numel()]
        from engine.distributed import parallel_state as ps
        whole = experts(8, True, torch.float32)
        x, weights, ids = routed(9, 8, torch.float32)
        total = 0
        for rank in range(2):  # expert parallel ranks, simulated: experts 0-3 and 4-7
            ps._state = ps.ParallelState(rank, 2, tp_size=2, expert_parallel=True)
            layer = FusedMoE(8, 64, 48, whole.activation, bias=True)
            ps._state = ps.ParallelState()
            for name, param in layer.named_parameters():
                layer.weight_loader(param, getattr(whole, name).data)
            total = total + triton_fused_experts(layer, x, weights, ids)
        errors["expert parallel"] = [(total - fused_experts(whole, x, weights, ids)).abs().max().item()]
        print(json.dumps(errors))
        """
    )
    return json.loads(out.splitlines()[-1])


def test_kernel_equals_fused_experts_in_float32(interpreted):
    errors = interpreted["float32"]
    assert len(errors) == 6 and max(errors) < 1e-5, errors


def test_kernel_equals_fused_experts_in_bfloat16(interpreted):
    errors = interpreted["bfloat16"]
    assert len(errors) == 6 and max(errors) < 3e-2, errors


def test_only_rank_0_adds_the_down_projection_bias(interpreted):
    assert interpreted["rank 1"][0] < 1e-5  # fused_experts leaves it out on rank 1 too
    assert interpreted["rank 0 - rank 1"][0] > 1e-2  # and it is there on rank 0


def test_expert_parallel_ranks_skip_other_ranks_pairs_and_sum_to_the_whole_layer(interpreted):
    assert interpreted["expert parallel"][0] < 1e-5


def test_no_tokens_give_an_empty_result(interpreted):
    assert interpreted["no tokens"] == [0]


def test_alignment_pads_each_expert_s_pairs_to_whole_blocks():
    from engine.kernels.triton_moe import align_pairs

    ids = torch.tensor([[0, 2], [2, 1], [0, 2]])  # pairs 0..5; 6 marks padding
    sorted_pairs, block_expert = align_pairs(ids, num_experts=4, block_m=4)
    pad = 6
    assert sorted_pairs.tolist()[:12] == [0, 4, pad, pad, 3, pad, pad, pad, 1, 2, 5, pad]
    assert set(sorted_pairs.tolist()[12:]) == {pad}
    assert block_expert.tolist() == [0, 1, 2, -1, -1]  # expert 3 has no pairs: no block


def test_the_cpu_default_is_the_torch_path():
    layer = FusedMoE(4, 32, 32, lambda gate_up: gate_up[:, :32])
    assert layer.use_triton is None  # None: the kernel on CUDA only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_on_cuda_runs_the_kernel_and_equals_fused_experts(dtype, monkeypatch):
    import engine.kernels.triton_moe as triton_moe

    torch.manual_seed(0)
    calls = []
    kernel = triton_moe.triton_fused_experts
    monkeypatch.setattr(triton_moe, "triton_fused_experts", lambda *a: calls.append(1) or kernel(*a))

    def swiglu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    layer = FusedMoE(8, 256, 512, swiglu, bias=True)
    for param in layer.parameters():
        param.data.normal_(0, 0.05)
    layer = layer.to("cuda", dtype)
    for num_tokens in (1, 33, 1000):  # 1000 * 2 pairs: BLOCK_M = 64 tiles
        weights, ids = select_experts(torch.randn(num_tokens, 8, device="cuda"), 2, renormalize=True)
        x = torch.randn(num_tokens, 256, device="cuda", dtype=dtype)
        expected = fused_experts(layer, x, weights, ids).float()
        got = layer(x, weights, ids).float()
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    assert len(calls) == 3
