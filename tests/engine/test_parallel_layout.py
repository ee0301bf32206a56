"""Parallel layouts are checked before any process starts; pipeline micro-batches cover the step."""

from __future__ import annotations

import pytest

from engine import EngineConfig, EngineConfigError, LLMEngine
from engine.core.step_plan import StepPlan
from engine.distributed.parallel_state import stage_layers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"tensor_parallel_size": 3},
            r"tensor_parallel_size=3 must divide the model's num_attention_heads \(8\)",
        ),
        (
            {"pipeline_parallel_size": 5},
            r"pipeline_parallel_size=5 is more than the model's num_hidden_layers \(4\)",
        ),
        ({"tensor_parallel_size": 2, "device": "cuda:1"}, "names one GPU"),
    ],
)
def test_a_layout_the_model_cannot_take_is_refused_naming_the_option(tiny_checkpoint, options, message):
    with pytest.raises(EngineConfigError, match=message):
        LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), **options))


@pytest.mark.parametrize("name", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_sizes_must_be_positive(tiny_checkpoint, name):
    with pytest.raises(EngineConfigError, match=f"{name} must be a positive integer"):
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), **{name: 0})


def test_stages_are_contiguous_and_cover_every_layer_once():
    for num_layers, pp in [(4, 2), (5, 2), (7, 3), (3, 3)]:
        stages = [stage_layers(num_layers, pp, rank) for rank in range(pp)]
        assert [i for stage in stages for i in stage] == list(range(num_layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


def test_micro_batches_split_the_step_in_order_with_balanced_tokens():
    token_ids = [[7] * n for n in [1, 1, 1, 1, 1, 1, 1, 1]]
    plan = StepPlan(list(range(8)), token_ids, [5] * 8, [True] * 8)
    micro = plan.split(4)
    assert [m.num_seqs for m in micro] == [2, 2, 2, 2]
    assert [s for m in micro for s in m.seq_ids] == plan.seq_ids
    assert all(not m.sampling_params for m in micro)  # the last stage samples once, for the whole step
    # the persistent batch's changes are applied once for the whole step, not per micro-batch
    assert all(not m.block_table_updates and not m.released_seq_ids for m in micro)
    uneven = StepPlan(list(range(4)), [[7] * 30, [7], [7], [7]], [0] * 4, [True] * 4)
    assert [m.num_seqs for m in uneven.split(2)] == [1, 3]
    assert len(plan.split(100)) == 8  # never an empty micro-batch
