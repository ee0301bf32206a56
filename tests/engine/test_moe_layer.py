"""The mixture-of-experts layer (engine.layers.moe) and the MXFP4 format (engine.quant.mxfp4)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.activation import ActAndMul
from engine.layers.moe import FusedMoE, fused_experts, looped_experts, select_experts
from engine.quant import mxfp4

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 8, 64, 32, 2


def _experts(bias: bool = False) -> FusedMoE:
    torch.manual_seed(0)
    experts = FusedMoE(NUM_EXPERTS, HIDDEN, INTERMEDIATE, ActAndMul("silu"), bias=bias)
    for param in experts.parameters():
        param.data.normal_(0.0, 0.1)
    return experts


def _routing(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(num_tokens, HIDDEN)
    weights, ids = select_experts(torch.randn(num_tokens, NUM_EXPERTS), TOP_K, renormalize=True)
    return x, weights, ids


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped-mm", "matmul-per-expert"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_grouped_experts_equal_a_loop_over_experts(use_grouped_mm, bias):
    experts = _experts(bias)
    experts.use_grouped_mm = use_grouped_mm
    x, weights, ids = _routing(37)
    torch.testing.assert_close(
        fused_experts(experts, x, weights, ids), looped_experts(experts, x, weights, ids)
    )


def test_grouped_experts_skip_experts_no_token_chose():
    experts = _experts()
    x = torch.randn(5, HIDDEN)
    ids = torch.tensor([[3, 5]] * 5)  # six of the eight experts get nothing
    weights = torch.full((5, 2), 0.5)
    torch.testing.assert_close(
        fused_experts(experts, x, weights, ids), looped_experts(experts, x, weights, ids)
    )


def test_router_renormalises_the_top_k_probabilities_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = select_experts(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.softmax(logits, -1)[:, :2])
    renormalised, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(1))


def test_router_softmax_after_top_k_weighs_only_the_chosen_experts():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = select_experts(logits, 2, renormalize=False, softmax_after_top_k=True)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_loading_an_expert_index_past_the_last_expert_is_a_value_error():
    experts = _experts()
    with pytest.raises(ValueError, match="is expert 8, but the model has 8 experts"):
        experts.weight_loader(experts.down_proj, torch.zeros(HIDDEN, INTERMEDIATE), NUM_EXPERTS)


def test_mxfp4_round_trips_values_on_its_grid_exactly():
    codes = torch.tensor(mxfp4.FP4_VALUES).repeat(2 * 4)  # 128 values, 4 blocks
    weight = (codes * torch.tensor([0.25, 1.0, 4.0, 2.0**-10]).repeat_interleave(32)).view(2, 64)
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.shape == (2, 2, 16) and scales.shape == (2, 2) and blocks.dtype == torch.uint8
    torch.testing.assert_close(mxfp4.dequantize(blocks, scales), weight, rtol=0, atol=0)


def test_mxfp4_rounds_other_values_within_a_block_step():
    weight = torch.randn(4, 96)
    restored = mxfp4.dequantize(*mxfp4.quantize(weight))
    block_max = weight.view(4, 3, 32).abs().amax(-1, keepdim=True)
    # e2m1's widest gap is 2 (between 4 and 6) at scale amax / 4..8: under amax / 2
    assert ((restored - weight).view(4, 3, 32).abs() <= block_max / 2).all()


def test_mxfp4_blocks_that_do_not_fit_their_scales_are_a_value_error():
    with pytest.raises(ValueError, match="do not fit scales"):
        mxfp4.dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
