"""CPU linear weights packed once by oneDNN compute what F.linear computes, and only where they should."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import LinearBase, ReplicatedLinear
from engine.layers.packed_linear import ONEDNN_PACKED, can_pack, pack_linear_weights
from engine.quant.base import UNQUANTIZED, LinearMethod

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


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_bfloat16_layer_gives_exactly_what_f_linear_gives(bias):
    layer = _layer(torch.bfloat16, bias)
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)  # any leading shape, any number of rows
    expected = layer(x)
    assert pack_linear_weights(layer, torch.device("cpu"), torch.bfloat16) == 1
    assert layer.quant_method is ONEDNN_PACKED and layer.weight.is_mkldnn
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_a_packed_float32_layer_matches_f_linear_to_the_last_bits(rows):
    layer = _layer(torch.float32, bias=True)
    x = torch.randn(rows, 96)
    expected = layer(x)
    pack_linear_weights(layer, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_keeps_the_weight_shape_dtype_and_byte_count():
    layer = _layer(torch.bfloat16, bias=False)
    shape, nbytes = layer.weight.shape, layer.quant_method.weight_bytes(layer)
    pack_linear_weights(layer, torch.device("cpu"), torch.bfloat16)
    assert layer.weight.shape == shape and layer.weight.dtype == torch.bfloat16
    assert layer.quant_method.weight_bytes(layer) == nbytes


def test_quantised_layers_and_other_devices_or_dtypes_are_left_alone():
    class Int8Like(LinearMethod):
        name = "int8"

    quantised = _layer(torch.float32, bias=False)
    quantised.quant_method = Int8Like()
    assert pack_linear_weights(quantised, torch.device("cpu"), torch.float32) == 0
    assert pack_linear_weights(_layer(torch.float16, False), torch.device("cpu"), torch.float16) == 0
    assert not can_pack(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_multiplies_by_packed_weights_and_a_tied_embedding_keeps_its_table(tied):
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


def _linear_methods(engine: LLMEngine) -> set:
    return {m.quant_method for m in engine.runner.model.modules() if isinstance(m, LinearBase)}


def test_a_cpu_engine_packs_its_linear_layers_unless_told_not_to(tiny_checkpoint):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = {}
    for prepack in (True, False):
        config = EngineConfig(model=str(tiny_checkpoint), dtype="float32", cpu_weight_prepack=prepack)
        with LLMEngine(config) as engine:
            assert _linear_methods(engine) == ({ONEDNN_PACKED} if prepack else {UNQUANTIZED})
            outputs[prepack] = [
                o.token_ids for o in engine.generate([[1, 7, 9, 11, 13]], params, use_tqdm=False)
            ]
    assert outputs[True] == outputs[False]
