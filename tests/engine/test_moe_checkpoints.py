"""MoE checkpoints: GPT-OSS's MXFP4 experts, stacked or per-expert tensors, tensor-parallel shards.

A stacked Mixtral / Qwen3-MoE folder is what Transformers 5.24 writes with
save_pretrained(save_original_format=False): `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I]; the demo presets are per-expert (its default).

A pre-quantised GPT-OSS folder is built the way real ones are stored: each expert tensor as
`*_blocks` (e2m1 pairs) and `*_scales` (e8m0 per 32 values), quantization_config
quant_method "mxfp4". The engine dequantises it at load; Transformers runs the same weights
dequantised (a dense folder) as the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine
from engine.demo.checkpoints import ensure_checkpoint
from engine.loader.weights import WeightLoadError, build_model
from engine.quant import mxfp4
from tests.engine.test_model_families import GREEDY, SMALL_KV, SMALL_POOL, _generate, _prompts

EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def test_mxfp4_gpt_oss_folder_gives_transformers_tokens_on_its_dequantised_weights(model_cache, tmp_path):
    packed, dense = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    prompts = _prompts(512, lengths=[3, 40, 17])
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(packed), **SMALL_POOL))
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outputs] == [_generate(reference, p) for p in prompts]


def test_mxfp4_folder_missing_a_scales_tensor_names_it(model_cache, tmp_path):
    packed, _ = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    tensors = load_file(packed / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        WeightLoadError, match=r"lacks 1 tensor\(s\).*layers\.1\.mlp\.experts\.down_proj_scales"
    ):
        LLMEngine(EngineConfig(dtype="float32", model=str(packed), **SMALL_POOL))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-mixtral", "stacked-mixtral", "mxfp4-gpt-oss"])
def test_tensor_parallel_experts_give_one_process_s_tokens(model_cache, tmp_path, preset):
    if preset == "mxfp4-gpt-oss":  # sinks split by head, MXFP4 experts split after dequantising
        folder, _ = _mxfp4_and_dequantised(ensure_checkpoint(model_cache, preset="tiny-gpt-oss"), tmp_path)
    elif preset == "stacked-mixtral":  # each rank reads its rows of the stacked tensors only
        folder = _stacked_folder(ensure_checkpoint(model_cache, preset="tiny-mixtral"), tmp_path)
        shutil.copytree(
            ensure_checkpoint(model_cache, preset="tiny-mixtral"),
            folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("*.safetensors*", "config.json"),
        )
    else:
        folder = ensure_checkpoint(model_cache, preset=preset)
    prompts = _prompts(512)
    with LLMEngine(EngineConfig(dtype="float32", model=str(folder), **SMALL_KV)) as single:
        expected = [o.token_ids for o in single.generate(prompts, GREEDY, use_tqdm=False)]
    config = EngineConfig(dtype="float32", model=str(folder), tensor_parallel_size=2, **SMALL_KV)
    with LLMEngine(config) as engine:
        outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outputs] == expected
        assert sum(o.metrics.num_preemptions for o in outputs) > 0


def _mxfp4_and_dequantised(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(the MXFP4 folder, a dense folder holding exactly the weights it dequantises to)."""
    packed, dense = tmp_path / "mxfp4", tmp_path / "dequantised"
    shutil.copytree(source, packed)
    shutil.copytree(source, dense)
    tensors = load_file(source / "model.safetensors")
    packed_tensors, dense_tensors = dict(tensors), dict(tensors)
    for name, weight in tensors.items():
        if name.endswith(EXPERT_TENSORS):  # [E, in, out]; stored as [E, out, in / 32, 16]
            blocks, scales = mxfp4.quantize(weight.transpose(1, 2).contiguous())
            del packed_tensors[name]
            packed_tensors[f"{name}_blocks"], packed_tensors[f"{name}_scales"] = blocks, scales
            dense_tensors[name] = mxfp4.dequantize(blocks, scales).transpose(1, 2).contiguous()
    save_file(packed_tensors, packed / "model.safetensors", metadata={"format": "pt"})
    save_file(dense_tensors, dense / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["self_attn", "router"],
    }
    (packed / "config.json").write_text(json.dumps(config, indent=2))
    return packed, dense


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_stacked_expert_tensors_load_the_same_weights_as_per_expert_ones(model_cache, tmp_path, preset):
    per_expert = ensure_checkpoint(model_cache, preset=preset)
    stacked = _stacked_folder(per_expert, tmp_path)
    names = load_file(stacked / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)
    expected = build_model(per_expert, torch.float32, "cpu").state_dict()
    loaded = build_model(stacked, torch.float32, "cpu").state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_stacked_folder_missing_a_layer_s_down_projection_names_it(model_cache, tmp_path):
    stacked = _stacked_folder(ensure_checkpoint(model_cache, preset="tiny-mixtral"), tmp_path)
    tensors = load_file(stacked / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj"]
    save_file(tensors, stacked / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        WeightLoadError, match=r"lacks 1 tensor\(s\).*: model\.layers\.1\.mlp\.experts\.down_proj$"
    ):
        build_model(stacked, torch.float32, "cpu")


def _stacked_folder(per_expert: Path, tmp_path: Path) -> Path:
    """The checkpoint as Transformers 5.24 writes it with save_original_format=False: stacked experts."""
    stacked = tmp_path / "stacked"
    model = AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    model.save_pretrained(stacked, save_original_format=False)
    return stacked
