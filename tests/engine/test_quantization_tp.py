"""Quantisation composes with tensor parallelism: each rank quantises its own shard.

The ranks are simulated in one process (the layers read their rank and world size when
built); what a real all-reduce would add up and an all-gather would concatenate is added up
and concatenated here.
"""

from __future__ import annotations

import pytest
import torch

import engine.layers.linear as linear_module
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine.quant.bnb import BnbPrequantizedLinearMethod
from engine.quant.plan import QuantPlan
from engine.quant.w8a8 import W8A8LinearMethod, quantize_weight

IN, OUT = 256, 128


@pytest.fixture
def weight_and_input():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(OUT, IN, generator=generator) * 0.05, torch.randn(5, IN, generator=generator)


def _layer(monkeypatch, cls, rank: int, size: int, weight: torch.Tensor, mode: str):
    monkeypatch.setattr(linear_module, "get_tp_rank", lambda: rank)
    monkeypatch.setattr(linear_module, "get_tp_size", lambda: size)
    layer = cls(IN, OUT)
    layer.weight.weight_loader(layer.weight, weight)
    layer.quant_method = QuantPlan(mode=mode).make_method()
    layer.quant_method.process_weights_after_loading(layer)
    return layer.to("cpu")  # bitsandbytes quantises here


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "w8a8"])
def test_column_parallel_shards_quantise_to_exactly_the_whole_layers_rows(
    monkeypatch, weight_and_input, mode
):
    # int8 scales are per output row and 4-bit blocks (64 values) never straddle the shards'
    # rows here, so the ranks' codes are the whole layer's, split.
    weight, x = weight_and_input
    whole = _layer(monkeypatch, ColumnParallelLinear, 0, 1, weight, mode)
    shards = [_layer(monkeypatch, ColumnParallelLinear, r, 2, weight, mode) for r in range(2)]
    with torch.inference_mode():
        gathered = torch.cat([s(x) for s in shards], dim=-1)
        torch.testing.assert_close(gathered, whole(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("mode", "max_relative_error"), [("int8", 0.02), ("nf4", 0.15), ("fp4", 0.2), ("w8a8", 0.03)]
)
def test_row_parallel_partial_products_of_quantised_shards_sum_to_the_float_product(
    monkeypatch, weight_and_input, mode, max_relative_error
):
    # Each rank's scales cover its half of the input features: different codes from the
    # whole layer's, the same error budget.
    weight, x = weight_and_input
    expected = x @ weight.T
    whole = _layer(monkeypatch, RowParallelLinear, 0, 1, weight, mode)
    shards = [_layer(monkeypatch, RowParallelLinear, r, 2, weight, mode) for r in range(2)]
    half = IN // 2
    with torch.inference_mode():
        summed = sum(s(x[:, r * half : (r + 1) * half]) for r, s in enumerate(shards))  # the all-reduce
        whole_error = ((whole(x) - expected).norm() / expected.norm()).item()
    error = ((summed - expected).norm() / expected.norm()).item()
    assert error <= max_relative_error
    assert error <= 1.5 * whole_error + 1e-3


def test_prequantised_checkpoint_is_refused_on_more_than_one_rank(monkeypatch):
    monkeypatch.setattr(linear_module, "get_tp_rank", lambda: 0)
    monkeypatch.setattr(linear_module, "get_tp_size", lambda: 2)
    layer = RowParallelLinear(IN, OUT)
    method = BnbPrequantizedLinearMethod("nf4", 6.0, torch.float32)
    with pytest.raises(ValueError, match="cannot be split across tensor-parallel ranks"):
        method.create_weights(layer)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_compressed_tensors_int8_weights_and_scales_load_as_each_ranks_shard(
    monkeypatch, weight_and_input, cls
):
    # a W8A8 checkpoint's codes [N, K] and scales [N, 1]: column-parallel ranks take their rows of
    # both, row-parallel ranks their columns of the codes and every row's scale
    weight, _ = weight_and_input
    w_q, w_scale = quantize_weight(weight)
    layers = []
    for rank in range(2):
        monkeypatch.setattr(linear_module, "get_tp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(linear_module, "get_tp_size", lambda: 2)
        layer = cls(IN, OUT)
        layer.quant_method = W8A8LinearMethod(prequantized=True)
        layer.quant_method.create_weights(layer)
        layer.weight.weight_loader(layer.weight, w_q)
        layer.weight_scale.weight_loader(layer.weight_scale, w_scale[:, None])
        layer.quant_method.process_weights_after_loading(layer)
        layers.append(layer)
    if cls is ColumnParallelLinear:
        assert torch.equal(torch.cat([s.weight_int8 for s in layers]), w_q)
        assert torch.equal(torch.cat([s.weight_scale for s in layers]), w_scale)
    else:
        assert torch.equal(torch.cat([s.weight_int8 for s in layers], dim=1), w_q)
        assert all(torch.equal(s.weight_scale, w_scale) for s in layers)


def test_an_int8_lm_head_s_vocabulary_shards_give_the_whole_head_s_logits(monkeypatch, weight_and_input):
    # quantize_lm_head: codes per vocabulary row, so each rank's rows are the whole head's, split;
    # the activations are per token, the same on every rank
    from engine.layers import embed_head
    from engine.layers.embed_head import ParallelLMHead
    from engine.quant.w8a8 import quantize_lm_head

    weight, x = weight_and_input  # [vocab 128, hidden 256]

    def head(rank: int, size: int) -> ParallelLMHead:
        monkeypatch.setattr(embed_head, "get_tp_rank", lambda: rank)
        monkeypatch.setattr(embed_head, "get_tp_size", lambda: size)
        module = ParallelLMHead(OUT, IN)
        module.weight.weight_loader(module.weight, weight)
        quantize_lm_head(module, tied=False)
        return module

    whole, shards = head(0, 1), [head(r, 2) for r in range(2)]
    with torch.inference_mode():
        gathered = torch.cat([s.matmul(x) for s in shards], dim=-1)  # what all_gather puts together
        torch.testing.assert_close(gathered, whole.matmul(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([s.weight_int8 for s in shards]), whole.weight_int8)
