"""What one tensor-parallel rank loads: its own part of each checkpoint tensor, checked value by value.

The rank is simulated in this process (rank 1 of TP=2, no collectives run while loading), so
each parameter can be compared with the slice of the checkpoint it must hold.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from engine.distributed import parallel_state as ps
from engine.loader.weights import build_model


@pytest.fixture
def rank_1_of_2(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(ps, "_state", ps.ParallelState(rank=1, world_size=2, tp_size=2))
    model = build_model(tiny_checkpoint, torch.float32, "cpu")
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        full = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return model, full


def test_rank_1_holds_the_second_half_of_every_split_tensor(rank_1_of_2):
    model, full = rank_1_of_2
    config = model.config  # 8 heads and 2 KV heads of 32, intermediate 688, vocab 4096
    q_rows, kv_rows, inter = 4 * 32, 1 * 32, config.intermediate_size // 2
    layer = model.model.layers[2]
    prefix = "model.layers.2."
    qkv = layer.self_attn.qkv_proj.weight
    assert torch.equal(qkv[:q_rows], full[prefix + "self_attn.q_proj.weight"][q_rows:])
    assert torch.equal(qkv[q_rows : q_rows + kv_rows], full[prefix + "self_attn.k_proj.weight"][kv_rows:])
    assert torch.equal(qkv[q_rows + kv_rows :], full[prefix + "self_attn.v_proj.weight"][kv_rows:])
    assert torch.equal(layer.self_attn.o_proj.weight, full[prefix + "self_attn.o_proj.weight"][:, q_rows:])
    gate_up = layer.mlp.gate_up_proj.weight
    assert torch.equal(gate_up[:inter], full[prefix + "mlp.gate_proj.weight"][inter:])
    assert torch.equal(gate_up[inter:], full[prefix + "mlp.up_proj.weight"][inter:])
    assert torch.equal(layer.mlp.down_proj.weight, full[prefix + "mlp.down_proj.weight"][:, inter:])
    half_vocab = config.vocab_size // 2
    assert torch.equal(model.model.embed_tokens.weight, full["model.embed_tokens.weight"][half_vocab:])
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"][half_vocab:])


def test_norms_are_whole_on_every_rank(rank_1_of_2):
    model, full = rank_1_of_2
    assert torch.equal(model.model.norm.weight, full["model.norm.weight"])
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, full["model.layers.0.input_layernorm.weight"])
