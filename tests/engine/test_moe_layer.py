"""The mixture-of-experts layer (engine.layers.moe) and the MXFP4 format (engine.quant.mxfp4)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.distributed import parallel_state
from engine.distributed.parallel_state import ParallelState
from engine.layers.activation import ActAndMul
from engine.layers.moe import FusedMoE, fused_experts, looped_experts, select_experts
from engine.loader.weights import _CheckpointSlice
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


def _rank_experts(monkeypatch, rank: int, size: int, bias: bool, per_expert: bool) -> FusedMoE:
    """Rank `rank` of `size` under expert parallelism (simulated in this process), loaded from _experts()."""
    monkeypatch.setattr(
        parallel_state, "_state", ParallelState(rank, size, tp_size=size, expert_parallel=True)
    )
    experts = FusedMoE(NUM_EXPERTS, HIDDEN, INTERMEDIATE, ActAndMul("silu"), bias=bias)
    monkeypatch.setattr(parallel_state, "_state", ParallelState())
    whole = _experts(bias)
    for name, param in experts.named_parameters():
        if per_expert and name in ("gate_up_proj", "down_proj"):
            _load_each_expert(experts, param, getattr(whole, name), halves=name == "gate_up_proj")
        else:
            experts.weight_loader(param, getattr(whole, name).data)
    return experts


def _load_each_expert(experts: FusedMoE, param, stacked: torch.Tensor, halves: bool) -> None:
    # as Mixtral's checkpoint stores them: experts.N.w1 / w3 (gate / up), experts.N.w2 (down)
    for expert in range(NUM_EXPERTS):
        if halves:
            for half, part in enumerate(stacked[expert].chunk(2)):
                experts.weight_loader(param, part, (expert, half))
        else:
            experts.weight_loader(param, stacked[expert], expert)


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_expert_parallel_ranks_hold_whole_experts_whose_outputs_sum_to_the_whole_layer(
    monkeypatch, bias, per_expert
):
    ranks = [_rank_experts(monkeypatch, rank, 4, bias, per_expert) for rank in range(4)]
    whole = _experts(bias)
    assert [(r.expert_start, r.num_local_experts) for r in ranks] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    torch.testing.assert_close(ranks[3].down_proj.data, whole.down_proj.data[6:8], rtol=0, atol=0)
    x, weights, ids = _routing(37)
    total = sum(fused_experts(r, x, weights, ids) for r in ranks)  # what the all-reduce sums
    torch.testing.assert_close(total, fused_experts(whole, x, weights, ids))
    looped = sum(looped_experts(r, x, weights, ids) for r in ranks)
    torch.testing.assert_close(looped, total)


def test_expert_parallel_rank_with_no_routed_token_contributes_zeros(monkeypatch):
    rank_1 = _rank_experts(monkeypatch, 1, 2, bias=True, per_expert=False)  # experts 4..7
    x = torch.randn(3, HIDDEN)
    ids = torch.tensor([[0, 3]] * 3)
    assert fused_experts(rank_1, x, torch.full((3, 2), 0.5), ids).abs().max() == 0


def test_expert_parallel_refuses_experts_the_ranks_cannot_split_evenly(monkeypatch):
    monkeypatch.setattr(parallel_state, "_state", ParallelState(0, 3, tp_size=3, expert_parallel=True))
    with pytest.raises(
        ValueError, match=r"expert_parallel: the number of experts \(8\) is not divisible by 3"
    ):
        FusedMoE(NUM_EXPERTS, HIDDEN, INTERMEDIATE, ActAndMul("silu"))


def test_expert_parallel_rank_reads_only_its_experts_rows_of_a_stacked_checkpoint_tensor(
    monkeypatch, tmp_path
):
    # tensor parallel loads hand the loader a lazy slice of the safetensors file (engine.loader.weights)
    whole = _experts()
    save_file({"down_proj": whole.down_proj.data.contiguous()}, tmp_path / "experts.safetensors")
    monkeypatch.setattr(parallel_state, "_state", ParallelState(1, 2, tp_size=2, expert_parallel=True))
    rank_1 = FusedMoE(NUM_EXPERTS, HIDDEN, INTERMEDIATE, ActAndMul("silu"))
    with safe_open(str(tmp_path / "experts.safetensors"), framework="pt") as f:
        rank_1.weight_loader(rank_1.down_proj, _CheckpointSlice(f.get_slice("down_proj")))
    torch.testing.assert_close(rank_1.down_proj.data, whole.down_proj.data[4:], rtol=0, atol=0)
