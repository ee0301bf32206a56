"""The grouped-GEMM Triton MoE kernel on packed MXFP4 experts (engine.kernels.triton_moe, MXFP4=True).

The packed kernel must equal the float kernel on the dequantised weights (the same tiles, the
same dot: exactly, under Triton's interpreter) and fused_experts on them. On CPU the kernel
runs only under the interpreter, switched on before triton is imported: the checks run in one
fresh interpreter process (as test_triton_moe.py does). The `gpu` test runs it on CUDA.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from engine.distributed import parallel_state as ps
from engine.layers.moe import FusedMoE
from engine.quant import mxfp4
from tests.engine.triton_interpreted import run_interpreted

# E experts, top-2, H = 64, I = 64; (E, T): odd token counts, T * k = 66 > 16 * E takes BLOCK_M = 64
CASES = "[(8, 1), (8, 5), (4, 33)]"

SETUP = """
import torch
from engine.layers.moe import FusedMoE, fused_experts, select_experts
from engine.kernels.triton_moe import PackedWeight, align_pairs, grouped_linear, triton_fused_experts
from tests.engine.test_triton_moe_mxfp4 import packed_and_dequantised, swiglu

def routed(num_tokens, num_experts, dtype, hidden=64):
    weights, ids = select_experts(torch.randn(num_tokens, num_experts), 2, renormalize=True)
    return torch.randn(num_tokens, hidden, dtype=dtype), weights, ids

def relative(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
"""


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def packed_and_dequantised(
    num_experts: int,
    bias: bool,
    dtype: torch.dtype,
    hidden: int = 64,
    intermediate: int = 64,
    std: float = 0.1,
) -> tuple[FusedMoE, FusedMoE]:
    """(a FusedMoE holding random packed MXFP4 experts, one holding what they dequantise to)."""
    dense = FusedMoE(num_experts, hidden, intermediate, swiglu, bias=bias)
    packed = FusedMoE(num_experts, hidden, intermediate, swiglu, bias=bias, mxfp4=True)
    for name, param in dense.named_parameters():
        param.data.normal_(0, std)
        if name.endswith("_bias"):
            packed.weight_loader(getattr(packed, name), param.data)
            continue
        blocks, scales = mxfp4.quantize(param.data)
        param.data.copy_(mxfp4.dequantize(blocks, scales))
        packed.weight_loader(getattr(packed, name + "_blocks"), blocks)
        packed.weight_loader(getattr(packed, name + "_scales"), scales)
    return packed.to(dtype), dense.to(dtype)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every interpreter check in one process (its start-up is most of the time): name -> errors."""
    out = run_interpreted(
        textwrap.dedent(SETUP)
        + textwrap.dedent(
            f"""
        import json
        torch.manual_seed(0)
        errors = {{}}
        for dtype in ("float32", "bfloat16"):
            kernel, layer_errors = [], []
            for num_experts, num_tokens in {CASES}:
                for bias in (False, True):
                    packed, dense = packed_and_dequantised(num_experts, bias, getattr(torch, dtype))
                    x, weights, ids = routed(num_tokens, num_experts, getattr(torch, dtype))
                    sorted_pairs, block_expert = align_pairs(ids, num_experts, 16)
                    packed_weight = PackedWeight(
                        packed.gate_up_proj_blocks, packed.gate_up_proj_scales, packed.mxfp4_values
                    )
                    for router in (None, weights.flatten().float().contiguous()):
                        common = dict(num_pairs=ids.numel(), top_k=2, block_m=16, router_weights=router)
                        bias_ = dense.gate_up_proj_bias
                        got = grouped_linear(x, packed_weight, bias_, sorted_pairs, block_expert, **common)
                        want = grouped_linear(x, dense.gate_up_proj, bias_, sorted_pairs, block_expert, **common)
                        kernel.append((got.float() - want.float()).abs().max().item())
                    expected = fused_experts(dense, x, weights, ids)
                    layer_errors.append(relative(triton_fused_experts(packed, x, weights, ids), expected))
            errors[dtype + " kernel"], errors[dtype + " layer"] = kernel, layer_errors
        from engine.distributed import parallel_state as ps
        for layout, expert_parallel in (("tensor parallel", False), ("expert parallel", True)):
            packed, dense = packed_and_dequantised(8, True, torch.float32)
            x, weights, ids = routed(9, 8, torch.float32)
            total = 0
            for rank in range(2):  # simulated ranks: I split 64 -> 2 x 32, or experts 0-3 and 4-7
                ps._state = ps.ParallelState(rank, 2, tp_size=2, expert_parallel=expert_parallel)
                shard = FusedMoE(8, 64, 64, swiglu, bias=True, mxfp4=True)
                ps._state = ps.ParallelState()
                for name, param in shard.named_parameters():
                    shard.weight_loader(param, getattr(packed, name).data)
                total = total + triton_fused_experts(shard, x, weights, ids)
            errors[layout] = [relative(total, fused_experts(dense, x, weights, ids))]
        print(json.dumps(errors))
        """
        ),
        timeout=300,
    )
    return json.loads(out.splitlines()[-1])


def test_packed_kernel_equals_the_float_kernel_on_dequantised_weights_in_float32(interpreted):
    errors = interpreted["float32 kernel"]  # with and without bias and router weights
    assert len(errors) == 12 and max(errors) == 0.0, errors


def test_packed_kernel_equals_the_float_kernel_on_dequantised_weights_in_bfloat16(interpreted):
    errors = interpreted["bfloat16 kernel"]
    assert len(errors) == 12 and max(errors) == 0.0, errors


def test_packed_experts_equal_fused_experts_on_dequantised_weights_in_float32(interpreted):
    errors = interpreted["float32 layer"]
    assert len(errors) == 6 and max(errors) < 1e-5, errors


def test_packed_experts_equal_fused_experts_on_dequantised_weights_in_bfloat16(interpreted):
    errors = interpreted["bfloat16 layer"]
    assert len(errors) == 6 and max(errors) < 3e-2, errors


def test_tensor_parallel_ranks_of_packed_experts_sum_to_the_whole_layer(interpreted):
    assert interpreted["tensor parallel"][0] < 1e-5


def test_expert_parallel_ranks_of_packed_experts_sum_to_the_whole_layer(interpreted):
    assert interpreted["expert parallel"][0] < 1e-5


def test_packed_expert_weights_take_4_25_bits_a_weight():
    packed = FusedMoE(8, 64, 96, torch.nn.functional.silu, mxfp4=True)
    dense = FusedMoE(8, 64, 96, torch.nn.functional.silu).to(torch.bfloat16)
    packed_bytes = sum(p.numel() * p.element_size() for p in packed.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert {p.dtype for p in packed.parameters()} == {torch.uint8}
    assert packed_bytes / dense_bytes == 4.25 / 16


def test_packed_shard_that_would_split_an_mxfp4_block_is_refused_by_name():
    ps._state = ps.ParallelState(0, 2, tp_size=2)
    try:
        with pytest.raises(ValueError, match="MXFP4 down_proj: this rank's input size"):
            FusedMoE(8, 64, 32, torch.nn.functional.silu, mxfp4=True)  # I / 2 = 16 < 32
    finally:
        ps._state = ps.ParallelState()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_fused_moe_on_cuda_runs_the_kernel_and_equals_fused_experts(dtype, monkeypatch):
    import engine.kernels.triton_moe as triton_moe
    from engine.layers.moe import fused_experts, select_experts

    torch.manual_seed(0)
    calls = []
    kernel = triton_moe.triton_fused_experts
    monkeypatch.setattr(triton_moe, "triton_fused_experts", lambda *a: calls.append(1) or kernel(*a))

    packed, dense = packed_and_dequantised(8, True, dtype, hidden=256, intermediate=512, std=0.05)
    dense, packed = dense.to("cuda"), packed.to("cuda")
    for num_tokens in (1, 33, 1000):  # 1000 * 2 pairs: BLOCK_M = 64 tiles
        weights, ids = select_experts(torch.randn(num_tokens, 8, device="cuda"), 2, renormalize=True)
        x = torch.randn(num_tokens, 256, device="cuda", dtype=dtype)
        expected = fused_experts(dense, x, weights, ids).float()
        got = packed(x, weights, ids).float()
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()
    assert len(calls) == 3
