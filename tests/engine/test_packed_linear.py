"""CPU linear weights packed once by oneDNN compute what F.linear computes, and only where they should;
where oneDNN has no bfloat16 path (AVX2-only CPUs) bfloat16 layers stay plain and still compute it.

The bfloat16 packing tests assert what this CPU supports (`cpu_features.onednn_has_bf16`); the
AVX2 path is tested on every machine by turning that feature off."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import cpu_features
from engine.layers import packed_linear
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import LinearBase, ReplicatedLinear
from engine.layers.packed_linear import BF16_ON_FP32, ONEDNN_PACKED, can_pack, pack_linear_weights
from engine.quant.base import UNQUANTIZED, LinearMethod
from tests.engine.transformers_greedy import transformers_greedy

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.float32), reason="this torch build has no oneDNN"
)


def _layer(dtype: torch.dtype, bias: bool) -> ReplicatedLinear:
    torch.manual_seed(0)
    with torch.device("cpu"):
        layer = ReplicatedLinear(96, 160, bias=bias).to(dtype)
    layer.weight.data.normal_()
    if bias:
        layer.bias.data.normal_()
    return layer


@pytest.fixture
def pack_every_size(monkeypatch):
    """This file's 96x160 float32 layers packed too (below MIN_PACKED_FLOAT32_WEIGHT they are not)."""
    monkeypatch.setattr(packed_linear, "MIN_PACKED_FLOAT32_WEIGHT", 0)


@pytest.fixture
def no_onednn_bf16(monkeypatch):
    """This CPU as an AVX2-only one is for the bfloat16 linears: oneDNN without a bfloat16 path."""
    monkeypatch.setattr(cpu_features, "onednn_has_bf16", lambda: False)


@pytest.mark.parametrize("bias", [False, True])
def test_a_bfloat16_layer_is_packed_exactly_where_onednn_computes_bfloat16(bias):
    layer = _layer(torch.bfloat16, bias)
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)  # any leading shape, any number of rows
    expected = layer(x)
    assert pack_linear_weights(layer, torch.device("cpu"), torch.bfloat16) == 1
    if cpu_features.onednn_has_bf16():
        assert layer.quant_method is ONEDNN_PACKED and layer.weight.is_mkldnn
        assert torch.equal(layer(x), expected)
    else:  # an AVX2-only CPU: the reorder would raise
        assert layer.quant_method is BF16_ON_FP32 and not layer.weight.is_mkldnn
        torch.testing.assert_close(layer(x), expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 7, 8, 300])
def test_without_onednn_bfloat16_a_layer_keeps_its_weight_and_rounds_a_float32_product(no_onednn_bf16, rows):
    layer = _layer(torch.bfloat16, bias=True)
    weight = layer.weight.detach().clone()
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    plain = torch.nn.functional.linear(x, weight, layer.bias)
    assert pack_linear_weights(layer, torch.device("cpu"), torch.bfloat16) == 1
    assert layer.quant_method is BF16_ON_FP32 and torch.equal(layer.weight, weight)  # bfloat16 storage
    if rows < BF16_ON_FP32.MIN_WIDENED_ROWS:  # PyTorch's own bfloat16 matmul: what Transformers runs
        assert torch.equal(layer(x), plain)
    else:  # exact products, float32 sums, one rounding to bfloat16
        exact = torch.nn.functional.linear(x.double(), weight.double(), layer.bias.double())
        assert layer(x).dtype == torch.bfloat16
        # within one bfloat16 rounding (half a unit in the last place: 2^-8 relative) of the exact result
        torch.testing.assert_close(layer(x).double(), exact, rtol=2**-8 + 1e-6, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_a_packed_float32_layer_matches_f_linear_to_the_last_bits(pack_every_size, rows):
    layer = _layer(torch.float32, bias=True)
    x = torch.randn(rows, 96)
    expected = layer(x)
    pack_linear_weights(layer, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_keeps_the_weight_shape_dtype_and_byte_count(pack_every_size, dtype):
    layer = _layer(dtype, bias=False)
    shape, nbytes = layer.weight.shape, layer.quant_method.weight_bytes(layer)
    pack_linear_weights(layer, torch.device("cpu"), dtype)
    assert layer.weight.shape == shape and layer.weight.dtype == dtype
    assert layer.quant_method.weight_bytes(layer) == nbytes


def test_quantised_layers_and_other_devices_or_dtypes_are_left_alone():
    class Int8Like(LinearMethod):
        name = "int8"

    quantised = _layer(torch.float32, bias=False)
    quantised.quant_method = Int8Like()
    assert pack_linear_weights(quantised, torch.device("cpu"), torch.float32) == 0
    assert pack_linear_weights(quantised.to(torch.bfloat16), torch.device("cpu"), torch.bfloat16) == 0
    assert pack_linear_weights(_layer(torch.float16, False), torch.device("cpu"), torch.float16) == 0
    assert not can_pack(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_multiplies_by_packed_weights_and_a_tied_embedding_keeps_its_table(pack_every_size, tied):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = VocabParallelEmbedding(50, 32)
    model.embed.weight.data.normal_()
    model.head = ParallelLMHead(50, 32, shared_weight=model.embed.weight if tied else None)
    model.head.weight.data.normal_()
    ids, hidden = torch.tensor([0, 7, 49]), torch.randn(4, 32)
    expected_rows, expected_logits = model.embed(ids), model.head(hidden)
    assert pack_linear_weights(model, torch.device("cpu"), torch.float32) == 1
    torch.testing.assert_close(model.head(hidden), expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.embed(ids), expected_rows)
    assert model.head.weight.is_mkldnn is not tied  # untied: the plain weight is gone, not kept twice


def test_small_float32_weights_stay_with_f_linear_and_large_ones_are_packed():
    # a packed call's fixed cost outweighs its gain below 2**18 elements (packed_linear's docstring)
    torch.manual_seed(0)
    model = torch.nn.Module()
    with torch.device("cpu"):
        model.small = ReplicatedLinear(128, 2047, bias=False)  # one row short of 2**18 elements
        model.large = ReplicatedLinear(128, 2048, bias=False)
        model.embed = VocabParallelEmbedding(100, 128)
        model.head = ParallelLMHead(100, 128)  # untied, 12,800 elements
        model.small_bf16 = ReplicatedLinear(96, 160, bias=False).to(torch.bfloat16)
    for parameter in model.parameters():
        parameter.data.normal_()
    x = torch.randn(5, 128)
    expected = model.small(x)
    assert pack_linear_weights(model, torch.device("cpu"), torch.float32) == 1
    assert model.small.quant_method is UNQUANTIZED and not model.small.weight.is_mkldnn
    assert torch.equal(model.small(x), expected)  # F.linear itself
    assert model.large.quant_method is ONEDNN_PACKED and model.large.weight.is_mkldnn
    assert model.head.matmul is None and not model.head.weight.is_mkldnn
    if cpu_features.onednn_has_bf16():  # bfloat16 weights are packed at every size
        assert pack_linear_weights(model, torch.device("cpu"), torch.bfloat16) == 1
        assert model.small_bf16.quant_method is ONEDNN_PACKED


def _linear_methods(engine: LLMEngine) -> set:
    return {m.quant_method for m in engine.runner.model.modules() if isinstance(m, LinearBase)}


def test_a_cpu_engine_packs_its_linear_layers_unless_told_not_to(tiny_checkpoint):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = {}
    for prepack in (True, False):
        config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", cpu_weight_prepack=prepack)
        with LLMEngine(config) as engine:
            for layer in engine.runner.model.modules():
                if isinstance(layer, LinearBase):  # tiny's qkv, o and down weights are small ones
                    large = layer.weight.numel() >= packed_linear.MIN_PACKED_FLOAT32_WEIGHT
                    assert layer.quant_method is (ONEDNN_PACKED if prepack and large else UNQUANTIZED)
            if prepack:
                assert ONEDNN_PACKED in _linear_methods(engine)
            outputs[prepack] = [
                o.token_ids for o in engine.generate([[1, 7, 9, 11, 13]], params, use_tqdm=False)
            ]
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["onednn-bf16", "avx2-like"])
def test_a_bfloat16_cpu_engine_starts_and_its_greedy_tokens_equal_transformers(
    tiny_checkpoint, monkeypatch, onednn_bf16
):
    if onednn_bf16 and not cpu_features.onednn_has_bf16():
        pytest.skip(f"oneDNN has no bfloat16 path on this CPU ({cpu_features.describe()})")
    monkeypatch.setattr(cpu_features, "onednn_has_bf16", lambda: onednn_bf16)
    prompts = [[1, 7, 9, 11, 13], [1, *range(20, 52)]]  # 5 and 33 rows: both bfloat16 paths
    expected = transformers_greedy(tiny_checkpoint, torch.bfloat16, prompts, 8)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="bfloat16")) as engine:
        methods = _linear_methods(engine)
        outputs = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert methods == ({ONEDNN_PACKED} if onednn_bf16 else {BF16_ON_FP32})
    assert outputs == expected
