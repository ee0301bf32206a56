"""The model registry, each family's checkpoint names and config styles, and RoPE scalings."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import EngineConfig, LLMEngine
from engine.demo.architectures import ARCHITECTURES
from engine.demo.checkpoints import ensure_checkpoint
from engine.demo.presets import PRESETS
from engine.layers import attention_backends
from engine.layers.attention import Attention
from engine.layers.rotary import RotaryEmbedding, rope_context_len, rope_parameters_from_config
from engine.loader.checkpoint import check_checkpoint_folder
from engine.loader.weights import WeightLoadError, build_model
from engine.models import MODEL_REGISTRY, max_context_len

REPO = Path(__file__).resolve().parents[2]
PROMPT = torch.tensor([1, *range(40, 79)])  # 40 tokens


def test_readme_lists_exactly_the_registered_architectures():
    section = REPO.joinpath("README.md").read_text().split("## Your own model")[1].split("\n## ")[0]
    assert set(re.findall(r"`(\w+For\w+)`", section)) == set(MODEL_REGISTRY)


def test_engine_docs_describe_every_registered_architecture():
    docs = REPO.joinpath("docs", "engine.md").read_text()
    assert [name for name in MODEL_REGISTRY if f"`{name}`" not in docs] == []


def test_every_registered_architecture_has_a_test_checkpoint():
    assert set(MODEL_REGISTRY) <= set(ARCHITECTURES)
    assert set(MODEL_REGISTRY) <= {preset.architecture for preset in PRESETS.values()}


def test_unsupported_architecture_is_refused_with_the_supported_list(model_cache, tmp_path):
    folder = _edit_config(
        ensure_checkpoint(model_cache, "tiny-qwen3"), tmp_path, {"architectures": ["DeepseekV3ForCausalLM"]}
    )
    with pytest.raises(
        Exception, match=r"DeepseekV3ForCausalLM.*supported: .*Gemma3ForConditionalGeneration"
    ):
        check_checkpoint_folder(folder)


def test_a_family_s_ignored_tensors_load_and_a_missing_tensor_still_fails(model_cache, tmp_path):
    source = ensure_checkpoint(model_cache, "tiny-qwen3")

    def add_mtp_and_inv_freq(tensors):
        tensors["mtp.layers.0.mlp.down_proj.weight"] = torch.zeros(4, 4)
        tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    folder = _rewrite(source, tmp_path / "extra", add_mtp_and_inv_freq)
    torch.testing.assert_close(_logits(folder), _logits(source), rtol=0, atol=0)

    def drop_q_norm(tensors):
        add_mtp_and_inv_freq(tensors)
        del tensors["model.layers.2.self_attn.q_norm.weight"]

    with pytest.raises(WeightLoadError, match=r"lacks 1 tensor.*model\.layers\.2\.self_attn\.q_norm\.weight"):
        build_model(_rewrite(source, tmp_path / "missing", drop_q_norm), torch.float32, "cpu")


def test_another_family_s_ignore_list_does_not_apply(model_cache, tmp_path):
    def add_mtp(tensors):
        tensors["mtp.layers.0.mlp.down_proj.weight"] = torch.zeros(4, 4)

    folder = _rewrite(ensure_checkpoint(model_cache, "tiny-llama-dynamic"), tmp_path / "ckpt", add_mtp)
    with pytest.raises(WeightLoadError, match=r"does not use: mtp\.layers\.0\.mlp\.down_proj\.weight"):
        build_model(folder, torch.float32, "cpu")


def test_multimodal_gemma3_loads_its_language_model_under_either_name_layout(model_cache, tmp_path):
    source = ensure_checkpoint(model_cache, "tiny-gemma3-mm")
    names = load_file(source / "model.safetensors").keys()
    assert any(n.startswith("vision_tower.") for n in names)  # skipped, not loaded
    assert any(n.startswith("multi_modal_projector.") for n in names)

    def in_memory_names(tensors):  # transformers 5's module names: model.language_model.*
        for name in list(tensors):
            new = re.sub(r"^language_model\.model\.", "model.language_model.", name)
            new = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", new)
            tensors[new] = tensors.pop(name)

    folder = _rewrite(source, tmp_path / "ckpt", in_memory_names)
    torch.testing.assert_close(_logits(folder), _logits(source), rtol=0, atol=0)
    config = check_checkpoint_folder(source)  # the language model's fields, for the engine's checks
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert (config["num_attention_heads"], config["vocab_size"]) == (4, 512)


def test_fused_qkv_of_the_wrong_size_names_the_tensor_and_both_shapes(model_cache, tmp_path):
    name = "model.layers.1.self_attn.qkv_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-16]

    folder = _rewrite(ensure_checkpoint(model_cache, "tiny-phi3"), tmp_path / "ckpt", shrink)
    with pytest.raises(WeightLoadError, match=rf"{re.escape(name)}.*\(112, 64\), expected \(128, 64\)"):
        build_model(folder, torch.float32, "cpu")


V4_STYLE = {
    # transformers 4.x: rope_theta and rope_scaling ("type") at the top level
    "tiny-qwen3-yarn": lambda c: {
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "tiny-llama-dynamic": lambda c: {
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
    },
    # Phi-3: LongRoPE's old name "su", partial_rotary_factor at the top level (transformers
    # 5.24 reads "su" only with original_max_position_embeddings inside rope_scaling)
    "tiny-phi4-mini": lambda c: {
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "su",
            "short_factor": c["rope_parameters"]["short_factor"],
            "long_factor": c["rope_parameters"]["long_factor"],
            "original_max_position_embeddings": 96,
        },
    },
    # Gemma 3: a global base, a local base, and rope_scaling for the global layers only
    "tiny-gemma3": lambda c: {
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    },
}


@pytest.mark.parametrize("preset", V4_STYLE)
def test_transformers_4_config_gives_the_same_model_as_the_5_config(model_cache, tmp_path, preset):
    source = ensure_checkpoint(model_cache, preset)
    config = json.loads((source / "config.json").read_text())
    old = {k: v for k, v in config.items() if k != "rope_parameters"} | V4_STYLE[preset](config)
    folder = Path(shutil.copytree(source, tmp_path / "v4"))
    (folder / "config.json").write_text(json.dumps(old))
    torch.testing.assert_close(_logits(folder), _logits(source), rtol=0, atol=0)
    assert max_context_len(old) == max_context_len(config)


def test_qwen2_5_long_context_recipe_matches_transformers(model_cache, tmp_path):
    # Qwen2.5's model card: add a 4.x-style YaRN rope_scaling to config.json
    from transformers import AutoModelForCausalLM

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    folder = _edit_config(
        ensure_checkpoint(model_cache, "tiny-qwen2"), tmp_path, {"rope_theta": 10000.0, "rope_scaling": yarn}
    )
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"]  # as a 4.x config.json is
    (folder / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = reference(PROMPT[None]).logits[0]
    torch.testing.assert_close(_logits(folder), theirs, rtol=1e-4, atol=1e-4)
    assert max_context_len(config) == 2048  # max(max_position_embeddings, 64 x 4)


@pytest.mark.parametrize(
    ("preset", "context"),
    [("tiny-qwen3-yarn", 256), ("tiny-llama-dynamic", 128), ("tiny-phi3", 256), ("tiny-gemma3", 256)],
)
def test_yarn_and_dynamic_ntk_extend_the_context(model_cache, preset, context):
    # YaRN: original_max_position_embeddings (64) x factor 4; dynamic: max_position_embeddings
    # (64) x factor 2; LongRoPE and linear: max_position_embeddings as it stands.
    engine = LLMEngine(
        EngineConfig(
            dtype="float32", model=str(ensure_checkpoint(model_cache, preset)), kv_cache_memory_gib=0.05
        )
    )
    assert engine.max_model_len == context


@pytest.mark.parametrize("rope_type", ["proportional", "mrope"])
def test_unsupported_rope_type_is_refused_by_name(model_cache, tmp_path, rope_type):
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    folder = _edit_config(ensure_checkpoint(model_cache, "tiny-qwen3"), tmp_path, {"rope_parameters": rope})
    with pytest.raises(Exception, match=f"rope type '{rope_type}' is not supported"):
        RotaryEmbedding(16, 64, rope_parameters_from_config(_hf_config(folder)))


def test_rope_tables_are_transformers_decode_time_rope():
    """Each position's cos/sin equals what Transformers' rotary embedding gives that position
    alone (its decode step), bit for bit, past the original context too."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    yarn = Qwen3Config(
        hidden_size=512,
        num_attention_heads=4,
        head_dim=128,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )

    dynamic = LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
    )
    longrope = Phi3Config(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + i / 10 for i in range(12)],
            "long_factor": [2.0 + i for i in range(12)],
        },
    )
    cases = [
        (dynamic, LlamaRotaryEmbedding, 128),
        (longrope, Phi3RotaryEmbedding, 32),
        (yarn, Qwen3RotaryEmbedding, 128),
    ]
    for config, theirs, head_dim in cases:
        params = rope_parameters_from_config(config)
        ours = RotaryEmbedding(head_dim, rope_context_len(params), params)
        reference = theirs(config)
        half = ours.rotary_dim // 2
        for position in [0, 63, 64, 65, 127, 128, 255, 256, 400, 511, 767]:
            if position >= ours.cos_sin_cache.shape[0]:
                continue
            cos, sin = reference(torch.zeros(1, 1, head_dim), torch.tensor([[position]]))
            cached = ours.cos_sin_cache[position]
            assert torch.equal(cached[:half], cos[0, 0, :half]), (config.model_type, position)
            assert torch.equal(cached[half:], sin[0, 0, :half]), (config.model_type, position)
    assert rope_context_len(rope_parameters_from_config(dynamic)) == 768  # 256 x 3
    assert rope_context_len(rope_parameters_from_config(yarn)) == 512  # 128 x 4


def test_gemma3_embedding_models_are_refused(model_cache, tmp_path):
    folder = _edit_config(
        ensure_checkpoint(model_cache, "tiny-gemma3"), tmp_path, {"use_bidirectional_attention": True}
    )
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        build_model(folder, torch.float32, "cpu")


def test_flash_without_soft_capping_refuses_a_soft_capped_layer(monkeypatch):
    monkeypatch.setattr(attention_backends, "flash_attn_has_softcap", lambda: False)
    layer = Attention(4, 16, 0.25, 2, logits_soft_cap=50.0)
    with pytest.raises(ValueError, match=r"attention_backend 'flash'.*attn_logit_softcapping.*>= 2\.6"):
        layer.backend = attention_backends.FlashAttentionBackend()
    Attention(4, 16, 0.25, 2).backend = attention_backends.FlashAttentionBackend()  # no cap: fine


def _logits(folder: Path) -> torch.Tensor:
    model = build_model(folder, torch.float32, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(PROMPT, torch.arange(len(PROMPT))))


def _hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _edit_config(source: Path, tmp_path: Path, changes: dict) -> Path:
    folder = Path(shutil.copytree(source, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))
    return folder


def _rewrite(source: Path, destination: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the checkpoint at `source` whose tensors `edit` has changed in place."""
    folder = Path(shutil.copytree(source, destination))
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata={"format": "pt"})
    return folder
