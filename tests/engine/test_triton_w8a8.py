"""W8A8 on CUDA (engine.kernels.triton_w8a8): the activation codes are quantize_per_token's, and
the int8 GEMM equals a float64 reference of the same integer arithmetic up to the epilogue's
float rounding, with and without a bias, for row counts below, at and above the blocks and
sizes that are no multiple of them.

On CPU the kernels run under Triton's interpreter (tests/engine/triton_interpreted.py): every
check in one fresh process. The `gpu` test runs a whole tiny model with `quantization: w8a8`
on CUDA against the same model on the CPU's reference kernel.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import EngineConfig
from engine.quant import QuantizationError, make_plan
from tests.engine.triton_interpreted import run_interpreted

# (rows, in features, out features): decode rows, a block's worth, more than a block; sizes
# that are no multiple of the 64-wide blocks
SHAPES = [(1, 96, 80), (16, 64, 64), (37, 200, 130), (130, 128, 72)]
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every interpreter check in one process: name -> result."""
    out = run_interpreted(
        f"""
        import json
        import torch
        from engine.kernels.triton_w8a8 import int8_linear, quantize_rows
        from engine.quant.w8a8 import quantize_per_token, quantize_weight

        torch.manual_seed(0)
        results = {{}}
        for rows, k, n in {SHAPES!r}:
            x = torch.randn(rows, k) * torch.logspace(-2, 1, rows)[:, None]  # tokens of unequal size
            x[0] = x[0].clamp(-100, 100)  # amax 127 below: codes = x, so these are exact ties
            x[0, :5] = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5])
            codes, scales = quantize_rows(x, 127)
            ref_codes, ref_scales = quantize_per_token(x, 127)
            assert codes[0, 1:5].tolist() == [0, 0, 2, 2], codes[0, :5]  # half to even
            results[f"codes {{rows}}x{{k}}"] = [
                bool(torch.equal(codes.float(), ref_codes)),
                bool(torch.equal(scales, ref_scales[:, 0])),
            ]
            w_q, w_scale = quantize_weight(torch.randn(n, k) / k**0.5, 127)
            bias = torch.randn(n)
            for with_bias in (False, True):
                b = bias if with_bias else None
                y = int8_linear(x, w_q, w_scale, b, 127).double()
                sums = ref_codes.double() @ w_q.double().t()
                expected = sums * ref_scales.double() * w_scale.double()
                bound = 8 * {EPS!r} * expected.abs()
                if with_bias:
                    expected = expected + bias.double()
                    bound = bound + 8 * {EPS!r} * bias.double().abs()
                results[f"gemm {{rows}}x{{k}}x{{n}} bias={{with_bias}}"] = bool(((y - expected).abs() <= bound).all())
        x = torch.randn(5, 64).to(torch.bfloat16)
        w_q, w_scale = quantize_weight(torch.randn(48, 64), 127)
        y = int8_linear(x, w_q, w_scale, None, 127)
        results["bfloat16 in, bfloat16 out"] = str(y.dtype)
        results["no rows"] = list(int8_linear(torch.empty(0, 64), w_q, w_scale, None).shape)
        print(json.dumps(results))
        """,
        timeout=300,
    )
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_activation_codes_and_scales_are_quantize_per_tokens(interpreted, rows, k, n):
    assert interpreted[f"codes {rows}x{k}"] == [True, True]  # ties round to even, as torch.round


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_int8_gemm_equals_a_float64_reference_of_its_integer_arithmetic(interpreted, rows, k, n, with_bias):
    assert interpreted[f"gemm {rows}x{k}x{n} bias={with_bias}"]


def test_the_output_is_in_the_activation_s_dtype_and_empty_steps_work(interpreted):
    assert interpreted["bfloat16 in, bfloat16 out"] == "torch.bfloat16"
    assert interpreted["no rows"] == [0, 48]


def test_w8a8_on_cuda_plans_the_triton_kernel_with_8_bit_codes_and_elsewhere_is_refused(tiny_checkpoint):
    config = EngineConfig(model=str(tiny_checkpoint), device="cuda", dtype="bfloat16", quantization="w8a8")
    method = make_plan(config, {}, torch.device("cuda")).make_method()
    assert (method.kernel, method.weight_max) == ("triton", 127)
    with pytest.raises(QuantizationError, match=r"w8a8.*CPU.*CUDA.*'meta'"):
        make_plan(config, {}, torch.device("meta"))


@pytest.mark.gpu
def test_a_w8a8_engine_on_cuda_gives_the_reference_kernel_s_tokens(tiny_checkpoint, monkeypatch):
    """The same integers on the tensor cores as the CPU's float reference kernel (B = A = 127):
    greedy tokens agree where the best token leads clearly (the float sums' order differs)."""
    from engine import LLMEngine, SamplingParams
    from engine.quant import w8a8

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1, *range(5, 5 + n)] for n in (1, 7, 30)]
    monkeypatch.setattr(
        w8a8, "choose_kernel", lambda device_type="cpu": "triton" if device_type == "cuda" else "reference"
    )

    def tokens(device: str, **options) -> list[list[int]]:
        config = EngineConfig(
            model=str(tiny_checkpoint), device=device, dtype="float32", quantization="w8a8", **options
        )
        return [o.token_ids for o in LLMEngine(config).generate(prompts, params, use_tqdm=False)]

    cpu, cuda = tokens("cpu", kv_cache_memory_gib=0.05), tokens("cuda", gpu_memory_utilization=0.3)
    same = sum(a == b for x, y in zip(cpu, cuda, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * sum(len(x) for x in cpu)
