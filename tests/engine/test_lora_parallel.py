"""LoRA adapters under tensor and pipeline parallelism: each rank holds its part of every adapter,
cut where its part of the base weight is, and the parallel engine gives PEFT's (and one
process's) greedy tokens in a batch mixing adapters and the base model.

The ranks of the first tests are simulated in this process (no collectives run), so each part
can be compared with the slice of the whole it must be; the engine tests run real worker
processes on CPU (gloo), as tests/engine/test_parallel.py does.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine import EngineConfig, LLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from engine.distributed import parallel_state as ps
from engine.layers import linear
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.loader.weights import build_model
from engine.lora import LoRASlots, read_adapter
from tests.engine.lora_adapters import (
    ADAPTERS,
    ALL_TARGETS,
    build_adapter,
    mixed_batch,
    peft_greedy,
    random_prompts,
)

MAX_TOKENS = 6


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


@pytest.fixture(scope="module")
def tiny_all_adapter(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-all")
    build_adapter(tiny_checkpoint, folder, 0, r=4, lora_alpha=4, target_modules=ALL_TARGETS)
    return folder


def test_rank_1_of_2_holds_its_rows_of_b_in_column_parallel_layers_and_its_columns_of_a_in_row_parallel_ones(
    tiny_checkpoint, tiny_all_adapter, monkeypatch
):
    _as_rank(monkeypatch, 1, 2)
    model = build_model(tiny_checkpoint, torch.float32, "cpu")
    full = read_adapter("all", tiny_all_adapter, max_rank=4)  # lora_alpha / r = 1: B as saved
    slots = LoRASlots(
        model, {"all": full}, max_loras=1, max_rank=4, device=torch.device("cpu"), dtype=torch.float32
    )
    slots.prepare_step(["all"], [1])  # loads it into slot 0
    q_rows, kv_rows, inter, r = 4 * 32, 32, model.config.intermediate_size // 2, 4

    def a_b(module):
        return full.weights[f"model.layers.2.{module}"]

    qkv = slots.layers["model.layers.2.self_attn.qkv_proj"]
    for i, (module, rows) in enumerate((("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))):
        a, b = a_b(f"self_attn.{module}")
        assert torch.equal(qkv.a[0, i * r : (i + 1) * r], a)  # A whole
        assert torch.equal(qkv.b[i][0], b[rows:])  # the second half of B's rows: rank 1's heads
    gate_up = slots.layers["model.layers.2.mlp.gate_up_proj"]
    for i, module in enumerate(("gate_proj", "up_proj")):
        a, b = a_b(f"mlp.{module}")
        assert torch.equal(gate_up.a[0, i * r : (i + 1) * r], a)
        assert torch.equal(gate_up.b[i][0], b[inter:])
    for module, columns in (("self_attn.o_proj", q_rows), ("mlp.down_proj", inter)):
        a, b = a_b(module)
        layer = slots.layers[f"model.layers.2.{module}"]
        assert torch.equal(layer.a[0], a[:, columns:])  # rank 1's input columns of A
        assert torch.equal(layer.b[0][0], b)  # B whole


# (preset, tensor_parallel_size, pipeline_parallel_size)
LAYOUTS = [
    pytest.param(("tiny", 2, 1), id="llama-tp2"),
    pytest.param(("tiny-qwen3", 2, 1), id="qwen3-tp2"),
    pytest.param(("tiny", 1, 2), id="llama-pp2"),
]


@pytest.mark.slow  # 10-85 s each on a 2-core machine: worker processes, PEFT's references
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_parallel_engine_gives_peft_s_and_one_process_s_tokens_in_a_batch_mixing_adapters(
    model_cache, tmp_path, layout
):
    preset, tp, pp = layout
    checkpoint = ensure_checkpoint(model_cache, preset=preset)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(vocab, lengths=(3, 17, 9, 24))  # prefill runs of both plan shapes
    folders, peft = {}, {}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        folders[name] = tmp_path / name
        build_adapter(checkpoint, folders[name], seed, **options)
        peft[name] = peft_greedy(checkpoint, folders[name], prompts, MAX_TOKENS)
    batch, params, owners = mixed_batch(prompts, [None, *ADAPTERS], MAX_TOKENS)
    options = {
        "dtype": "float32",
        "model": str(checkpoint),
        "lora_adapters": {name: str(folder) for name, folder in folders.items()},
        "enforce_eager": True,
    }
    with LLMEngine(EngineConfig(**options)) as single:
        expected = [o.token_ids for o in single.generate(batch, params, use_tqdm=False)]
    config = EngineConfig(**options, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    with LLMEngine(config) as engine:
        got = [o.token_ids for o in engine.generate(batch, params, use_tqdm=False)]
    assert got == expected
    base = {i: tokens for (name, i), tokens in zip(owners, got, strict=True) if name is None}
    for name in ADAPTERS:
        mine = {i: tokens for (owner, i), tokens in zip(owners, got, strict=True) if owner == name}
        assert mine == dict(enumerate(peft[name]))
        assert mine != base  # the adapter changes the output
