"""The fused CPU ops (engine/kernels/csrc/fused_ops.cpp) round where PyTorch's eager ops round: the
layers give the same values with their `fused` flag on as off."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import cpu_kernels
from engine.layers.activation import ActAndMul
from engine.layers.norm import GemmaRMSNorm, RMSNorm
from engine.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def kernels():
    assert cpu_kernels.load()  # the project's machines have a C++ compiler: never a skip


def eager_and_fused(module, call):
    module.fused = False
    eager = call()
    module.fused = True
    try:
        return eager, call()
    finally:
        module.fused = False


def assert_close(fused, eager, dtype):
    # bfloat16: the same bits but where a float32 sum runs in another order (one ulp at most);
    # float32: the last bits of that sum
    if dtype == torch.bfloat16:
        ulp = eager.float().abs() * 2**-7
        assert ((fused.float() - eager.float()).abs() <= ulp).all()
    else:
        torch.testing.assert_close(fused, eager, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
def test_rms_norm_with_its_residual_add_equals_the_eager_ops(dtype, norm_class):
    gen = torch.Generator().manual_seed(0)
    norm = norm_class(256, eps=1e-5).to(dtype)
    norm.weight.data = (1 + 0.2 * torch.randn(256, generator=gen)).to(dtype)
    x, residual = (torch.randn(37, 256, generator=gen).to(dtype) for _ in range(2))
    (eager, eager_sum), (fused, fused_sum) = eager_and_fused(norm, lambda: norm(x, residual))
    assert torch.equal(fused_sum, eager_sum)  # the next layer's residual: exactly x + residual
    assert_close(fused, eager, dtype)
    eager_alone, fused_alone = eager_and_fused(norm, lambda: norm(x))
    assert_close(fused_alone, eager_alone, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_equals_silu_of_the_gate_times_up(dtype):
    x = (3 * torch.randn(33, 2 * 300, generator=torch.Generator().manual_seed(1))).to(dtype)
    act = ActAndMul("silu")
    eager, fused = eager_and_fused(act, lambda: act(x))
    assert_close(fused, eager, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_the_projections_views_gives_the_eager_bits(dtype):
    rotary = RotaryEmbedding(64, 4096, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.tensor([0, 5, 4095, 17, 1000])
    qkv = torch.randn(5, (12 + 2 * 4) * 64, generator=torch.Generator().manual_seed(2)).to(dtype)

    def rotate():  # q and k as the attention layer has them: strided views of one projection
        fresh = qkv.clone()
        q, k = fresh[:, : 12 * 64].view(5, 12, 64), fresh[:, 12 * 64 : 16 * 64].view(5, 4, 64)
        rotary.forget_positions()
        q, k = rotary(positions, q, k)
        return torch.cat([q.flatten(1), k.flatten(1)], dim=1)

    eager, fused = eager_and_fused(rotary, rotate)
    assert torch.equal(fused, eager)


def test_a_partial_rotary_and_a_gelu_activation_keep_the_eager_path():
    partial = RotaryEmbedding(
        64, 128, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    )
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    positions = torch.arange(3)
    eager, fused = eager_and_fused(partial, lambda: partial(positions, q.clone(), k.clone()))
    assert all(torch.equal(a, b) for a, b in zip(eager, fused, strict=True))
    gelu = ActAndMul("gelu_pytorch_tanh")
    x = torch.randn(4, 16)
    eager, fused = eager_and_fused(gelu, lambda: gelu(x))
    assert torch.equal(eager, fused)


def test_the_engine_fuses_on_cpu_and_decodes_as_the_eager_ops_do(tiny_checkpoint):
    prompts = [[1, *range(5, 5 + n)] for n in (4, 50, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    runs = {}
    for fused in (True, False):
        engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", cpu_fused_ops=fused))
        flags = {type(m).__name__ for m in engine.runner.model.modules() if getattr(m, "fused", False)}
        runs[fused] = (flags, [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)])
    assert runs[True][0] == {"RMSNorm", "ActAndMul", "RotaryEmbedding"}
    assert runs[False][0] == set()
    assert runs[True][1] == runs[False][1]


@pytest.mark.parametrize("k", [7, 64, 300, 3072])  # below, at and past the vector width; tails
def test_w8a8_row_scaling_gives_the_eager_ops_bits(k):
    # engine.quant.w8a8.scale_rows: x * (A / max(|x|)) per row, and the maxima; an all-zero row
    # gets the least maximum, a row of one large value its own
    x = torch.randn(6, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    x[4, -1] = -1e6
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scaled, maxima = torch.ops.sluice_cpu.scale_rows(x, 127.0, 1e-12)
    assert torch.equal(maxima, amax)
    assert torch.equal(scaled, x * (127 / amax))
    strided = torch.randn(3, 2 * k)[:, :k]  # rows apart in memory, as a view of a wider tensor
    scaled, maxima = torch.ops.sluice_cpu.scale_rows(strided, 63.0, 1e-12)
    assert torch.equal(scaled, strided * (63 / strided.abs().amax(dim=-1, keepdim=True)))


@pytest.mark.parametrize(
    "vocab", [1, 5, 8, 17, 2048, 32001]
)  # one value, below, at and past the vector width; tails
def test_greedy_argmax_is_torch_argmax_with_ties_nans_and_infinities(vocab):
    # engine.executor.sampler.argmax: the first index of the largest value, a NaN above all
    gen = torch.Generator().manual_seed(vocab)
    rows = [
        torch.randn(vocab, generator=gen),
        torch.randint(0, 3, (vocab,), generator=gen).float(),  # ties: the first one wins
        torch.full((vocab,), float("-inf")),
        torch.full((vocab,), 7.0),
        torch.randn(vocab, generator=gen).masked_fill(torch.arange(vocab) >= vocab // 2, float("nan")),
        torch.randn(vocab, generator=gen).index_fill(0, torch.tensor([vocab - 1]), float("nan")),
        torch.randn(vocab, generator=gen).index_fill(0, torch.tensor([vocab - 1]), float("inf")),
        torch.zeros(vocab).index_fill(0, torch.tensor([vocab // 3]), -0.0),  # -0.0 == 0.0: index 0
    ]
    x = torch.stack(rows)
    assert torch.equal(cpu_kernels.argmax_rows(x), x.argmax(dim=-1))
    strided = torch.randn(3, 2 * vocab, generator=gen)[:, :vocab]  # rows of a wider tensor
    assert torch.equal(cpu_kernels.argmax_rows(strided), strided.argmax(dim=-1))
    assert cpu_kernels.argmax_rows(x[:0]).shape == (0,)


@pytest.mark.parametrize("vocab", [1, 31, 32, 100, 2048, 32001])  # within a word, at one, tails
def test_grammar_masks_hold_back_exactly_the_tokens_whose_bit_is_0_on_their_rows(vocab):
    # engine.executor.sampler._apply_grammar_masks on the CPU: bit j of word w allows token 32 * w + j
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32 + (vocab == 100)  # a bitmask may be wider than the logits
    logits = torch.randn(6, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, words), generator=gen, dtype=torch.int32)
    bitmask[1, ::2] = 0  # whole words held back
    bitmask[2] = -1  # a row under a grammar that allows everything now
    rows = torch.tensor([5, 0, 3, 2])  # any order
    allowed = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(4, -1)[:, :vocab]
    expected = logits.clone()
    expected[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    masked = cpu_kernels.apply_token_bitmask(logits, rows, bitmask)
    assert torch.equal(masked, expected)
    assert not logits.isinf().any()  # out of place
    assert torch.equal(cpu_kernels.apply_token_bitmask(logits, rows[:0], bitmask[:0]), logits)
    with pytest.raises(RuntimeError, match="not a row"):
        cpu_kernels.apply_token_bitmask(logits, torch.tensor([6]), bitmask[:1])
