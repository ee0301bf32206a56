"""LoRA adapters under tensor parallelism: each rank's part of a layer is cut where its part of
the base weight is, and a row-parallel layer's delta joins its partial output before the all-reduce.

The ranks are simulated in this process (no collectives run), so each part can be compared with
the slice of the whole it must be.
"""

from __future__ import annotations

import pytest
import torch

from engine.distributed import parallel_state as ps
from engine.layers import linear
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def _as_rank(monkeypatch, rank: int, tp_size: int) -> None:
    monkeypatch.setattr(ps, "_state", ps.ParallelState(rank=rank, world_size=tp_size, tp_size=tp_size))


@pytest.mark.parametrize(
    ("tp_size", "num_kv_heads"),
    [pytest.param(2, 2, id="tp2-a-kv-head-each"), pytest.param(4, 2, id="tp4-kv-heads-replicated")],
)
def test_a_column_parallel_rank_s_part_of_each_projection_is_the_rows_its_weight_loader_took(
    monkeypatch, tp_size, num_kv_heads
):
    hidden, head_dim, num_heads = 16, 4, 8
    for rank in range(tp_size):
        _as_rank(monkeypatch, rank, tp_size)
        qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads)
        gate_up = MergedColumnParallelLinear(hidden, [24, 24])
        full = {
            "q": torch.randn(num_heads * head_dim, hidden),
            "k": torch.randn(num_kv_heads * head_dim, hidden),
            "v": torch.randn(num_kv_heads * head_dim, hidden),
            0: torch.randn(24, hidden),
            1: torch.randn(24, hidden),
        }
        for layer, shards in ((qkv, "qkv"), (gate_up, (0, 1))):
            offset = 0
            for shard in shards:
                layer.weight_loader(layer.weight, full[shard], shard)
                part = layer.output_part(shard)
                assert part.total == full[shard].shape[0]
                held = layer.weight[offset : offset + part.size]
                assert torch.equal(held, full[shard].narrow(0, part.start, part.size))
                offset += part.size
            assert layer.input_part() == (0, hidden, hidden)  # A stays whole


def test_a_row_parallel_rank_s_part_is_the_input_columns_its_weight_loader_took(monkeypatch):
    full = torch.randn(16, 32)
    for rank in range(2):
        _as_rank(monkeypatch, rank, 2)
        o_proj = RowParallelLinear(32, 16)
        o_proj.weight_loader(o_proj.weight, full)
        part = o_proj.input_part()
        assert torch.equal(o_proj.weight, full.narrow(1, part.start, part.size))
        assert o_proj.output_part() == (0, 16, 16)  # B stays whole


def test_a_row_parallel_layer_adds_its_delta_to_its_partial_output_before_its_one_all_reduce(monkeypatch):
    reduced = []
    monkeypatch.setattr(linear, "all_reduce", lambda y: reduced.append(y.clone()) or y)
    o_proj = RowParallelLinear(8, 4)
    o_proj.weight.data.zero_()
    o_proj.output_delta = lambda x, y: y + x.sum(dim=1, keepdim=True)
    x = torch.ones(3, 8)
    o_proj(x)
    assert len(reduced) == 1  # no collective of the delta's own
    assert torch.equal(reduced[0], torch.full((3, 4), 8.0))  # the delta was in what was reduced
