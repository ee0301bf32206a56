"""A step's LoRA plan (engine/lora/mapping.py): whichever shape it takes, each token gets exactly
its own adapter's `x @ A^T @ B^T * scaling` on each projection's rows, and base-model tokens nothing."""

from __future__ import annotations

import types

import pytest
import torch

from engine.lora.mapping import LoRAMapping, LoRARuns, plan_step
from engine.lora.slots import _LayerSlots

IN, RANK, MAX_LORAS = 12, 4, 4
SHARDS = {"q": (0, 8), "k": (8, 4), "v": (12, 4)}  # a fused layer: shard -> (row offset, rows)
CPU = torch.device("cpu")


@pytest.fixture
def layer() -> tuple[_LayerSlots, dict]:
    return make_layer()


def make_layer(dtype=torch.float64, shards=SHARDS, in_size=IN, max_rank=RANK) -> tuple[_LayerSlots, dict]:
    """A fused layer's slots, each holding an adapter of rank max_rank / MAX_LORAS .. max_rank
    (one skips the second projection: `k`); and, per slot, its weights (float64, of values
    `dtype` holds) and scaling for the reference."""
    torch.manual_seed(0)
    fake = types.SimpleNamespace(input_size=in_size)
    slots = _LayerSlots(fake, shards, MAX_LORAS, max_rank, CPU, dtype)
    skipped = list(shards)[1] if len(shards) > 1 else None
    adapters = {}
    for slot in range(MAX_LORAS):
        r = (slot + 1) * max_rank // MAX_LORAS
        weights = {
            shard: (
                _held(torch.randn(r, in_size, dtype=torch.float64), dtype),
                _held(torch.randn(rows, r, dtype=torch.float64), dtype),
            )
            for shard, (_, rows) in shards.items()
            if not (slot == 2 and shard == skipped)
        }
        slots.load(slot, weights, scaling=0.5 * (slot + 1))
        adapters[slot] = (weights, 0.5 * (slot + 1))
    return slots, adapters


def _reference(x: torch.Tensor, token_slots: list[int], adapters: dict, shards=SHARDS) -> torch.Tensor:
    """Token by token, projection by projection: what PEFT adds to the fused output."""
    delta = torch.zeros(x.shape[0], sum(rows for _, rows in shards.values()), dtype=x.dtype)
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        weights, scaling = adapters[slot]
        for shard, (offset, rows) in shards.items():
            if shard in weights:
                a, b = weights[shard]
                delta[t, offset : offset + rows] = (x[t] @ a.T @ b.T) * scaling
    return delta


def _apply(layer, seq_slots: list[int], query_lens: list[int]):
    slots, adapters = layer
    token_slots = [s for s, n in zip(seq_slots, query_lens, strict=True) for _ in range(n)]
    x = torch.randn(len(token_slots), IN, dtype=torch.float64)
    base = torch.randn(len(token_slots), 16, dtype=torch.float64)
    plan = plan_step(seq_slots, query_lens, CPU)
    got = plan.apply(slots, x, base.clone())
    torch.testing.assert_close(got, base + _reference(x, token_slots, adapters))
    return plan


def test_a_decode_step_interleaving_adapters_is_one_padded_batch_per_slot(layer) -> None:
    plan = _apply(layer, [0, 1, 3, 0, 1, 3, 0, 1], [1] * 8)  # slot 2 unused: padding only
    assert plan.runs is None and (plan.padded.first, plan.padded.num_slots) == (0, 4)
    assert plan.padded.rows is None  # every token has an adapter: added in order, no scatter


def test_base_model_tokens_among_a_padded_batch_get_nothing_added(layer) -> None:
    plan = _apply(layer, [2, -1, 1, 2, -1, 1, 2, 1], [1] * 8)
    assert plan.runs is None and plan.padded.rows.tolist() == [0, 2, 3, 5, 6, 7]


def test_prefill_chunks_are_runs_and_neighbours_of_one_adapter_merge(layer) -> None:
    plan = _apply(layer, [1, 1, -1, 3, 0], [5, 3, 4, 6, 2])
    assert plan == LoRAMapping(LoRARuns([(1, 0, 8), (3, 12, 18), (0, 18, 20)]), None)


def test_a_long_chunk_among_decodes_runs_in_place_and_the_decodes_are_padded(layer) -> None:
    plan = _apply(layer, [0, 1, 2, 0, 1, 2, 3], [1, 1, 1, 1, 1, 1, 30])
    assert plan.runs == LoRARuns([(3, 6, 36)])
    assert plan.padded.rows.tolist() == [0, 1, 2, 3, 4, 5]


def test_short_runs_that_would_be_padded_to_over_twice_their_tokens_run_as_runs(layer) -> None:
    plan = _apply(layer, [0, 1, 0, 1, 2, 0, 1], [1, 1, 1, 1, 15, 1, 1])  # slot 2's 15 tokens: wide
    assert plan.padded is None and len(plan.runs.runs) == 7


def test_a_step_of_the_base_model_alone_has_no_plan() -> None:
    assert plan_step([-1, -1], [3, 1], CPU) is None


def _held(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` rounded to the values `dtype` holds, kept in float64."""
    return weight.to(dtype).to(torch.float64)
