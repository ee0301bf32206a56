"""Our Llama-family model gives Transformers' logits, and checkpoint errors name the file."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.demo.checkpoints import build_checkpoint, ensure_checkpoint
from engine.layers.rotary import RotaryEmbedding, rope_parameters_from_config
from engine.loader.checkpoint import ModelLoadError
from engine.loader.weights import WeightLoadError, build_model

PRESETS = ("tiny", "tiny-mistral", "tiny-qwen2", "tiny-mqa", "tiny-llama3")
PROMPT_LEN = 40  # longer than the sliding window (16) of tiny-mistral and tiny-qwen2
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("sharded") / "tiny", "tiny", seed=0, max_shard_size="2MB")


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_transformers_at_every_position(model_cache: Path, preset: str) -> None:
    folder = ensure_checkpoint(model_cache, preset=preset, seed=0)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = reference(_prompt()[None]).logits[0]
    torch.testing.assert_close(_our_logits(folder), theirs, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_gives_the_same_logits_as_one_file(
    tiny_checkpoint: Path, sharded_tiny: Path
) -> None:
    assert (sharded_tiny / "model.safetensors.index.json").is_file()
    assert len(list(sharded_tiny.glob("model-*.safetensors"))) > 1
    assert torch.equal(_our_logits(sharded_tiny), _our_logits(tiny_checkpoint))


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-mqa"])
def test_tied_lm_head_shares_storage_with_the_embedding(model_cache: Path, preset: str) -> None:
    model = build_model(ensure_checkpoint(model_cache, preset=preset), torch.float32, "cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_lm_head_has_its_own_weight(tiny_checkpoint: Path) -> None:
    model = build_model(tiny_checkpoint, torch.float32, "cpu")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_bfloat16_load_gives_bfloat16_weights_and_close_logits(tiny_checkpoint: Path) -> None:
    model = build_model(tiny_checkpoint, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        logits = model.compute_logits(model(_prompt(), torch.arange(PROMPT_LEN)))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), _our_logits(tiny_checkpoint), rtol=0.05, atol=0.1)


def test_build_model_uses_the_requested_dtype_only_while_building(tiny_checkpoint: Path) -> None:
    build_model(tiny_checkpoint, torch.bfloat16, "cpu")
    assert torch.get_default_dtype() == torch.float32


def test_rotary_inv_freq_and_tied_lm_head_tensors_are_ignored(model_cache: Path, tmp_path: Path) -> None:
    def add_ignored(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
        tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])

    folder = _rewrite(ensure_checkpoint(model_cache, preset="tiny-mqa"), tmp_path, add_ignored)
    model = build_model(folder, torch.float32, "cpu")
    assert model.lm_head.weight.abs().sum() > 0  # the embedding, not the zeros


def test_missing_shard_names_the_index_and_the_shard(sharded_tiny: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(sharded_tiny, tmp_path / "ckpt"))
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=rf"model\.safetensors\.index\.json.*{re.escape(shard.name)}"):
        build_model(folder, torch.float32, "cpu")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tiny_checkpoint: Path, tmp_path: Path, damage: str) -> None:
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=re.escape(str(path))):
        build_model(folder, torch.float32, "cpu")


def test_wrong_shape_names_the_tensor_and_both_shapes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:100]

    folder = _rewrite(tiny_checkpoint, tmp_path, shrink)
    with pytest.raises(WeightLoadError) as info:
        build_model(folder, torch.float32, "cpu")
    message = str(info.value)
    assert str(folder / "model.safetensors") in message and name in message
    assert "(100, 256)" in message and "(688, 256)" in message


def test_missing_tensors_are_listed_by_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    gone = ["model.layers.2.self_attn.k_proj.weight", "model.norm.weight"]

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for name in gone:
            del tensors[name]

    folder = _rewrite(tiny_checkpoint, tmp_path, drop)
    with pytest.raises(WeightLoadError, match="lacks 2 tensor") as info:
        build_model(folder, torch.float32, "cpu")
    assert str(folder) in str(info.value)
    assert all(name in str(info.value) for name in gone)


def test_missing_tensor_list_is_cut_at_five(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def drop_layer(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.3.")]:
            del tensors[name]

    folder = _rewrite(tiny_checkpoint, tmp_path, drop_layer)
    with pytest.raises(WeightLoadError, match="lacks 9 tensor") as info:
        build_model(folder, torch.float32, "cpu")
    assert str(info.value).count("model.layers.3.") == 5


def test_unknown_tensors_are_listed_by_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)

    folder = _rewrite(tiny_checkpoint, tmp_path, add)
    with pytest.raises(WeightLoadError, match=r"does not use: model\.layers\.0\.mlp\.extra\.weight"):
        build_model(folder, torch.float32, "cpu")


def test_weight_load_error_is_a_model_load_error() -> None:
    assert issubclass(WeightLoadError, ModelLoadError)


def test_rope_reads_transformers_4_and_5_config_styles_alike() -> None:
    v4 = SimpleNamespace(
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", "original_max_position_embeddings": 64, **LLAMA3_ROPE},
        max_position_embeddings=256,
    )
    v5 = SimpleNamespace(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "original_max_position_embeddings": 64,
            **LLAMA3_ROPE,
        },
        max_position_embeddings=256,
    )
    caches = [RotaryEmbedding(32, 256, rope_parameters_from_config(c)).cos_sin_cache for c in (v4, v5)]
    assert torch.equal(*caches)


@pytest.mark.parametrize("rope_type", ["proportional", "mrope"])
def test_unsupported_rope_type_is_named(rope_type: str) -> None:
    config = SimpleNamespace(
        rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0},
        max_position_embeddings=256,
    )
    with pytest.raises(ValueError, match=rope_type):
        RotaryEmbedding(32, 256, rope_parameters_from_config(config))


def _prompt() -> torch.Tensor:
    ids = torch.randint(4, 4096, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))
    ids[0] = 1  # BOS
    return ids


def _our_logits(folder: Path) -> torch.Tensor:
    model = build_model(folder, torch.float32, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(_prompt(), torch.arange(PROMPT_LEN)))  # [T, vocab]


def _rewrite(source: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the checkpoint at `source` whose tensors `edit` has changed in place."""
    folder = Path(shutil.copytree(source, tmp_path / "ckpt"))
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata={"format": "pt"})
    return folder
