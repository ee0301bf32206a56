"""Locally generated checkpoints load through the ordinary Hugging Face path."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.demo import checkpoints as demo_models
from engine.demo.checkpoints import build_checkpoint, ensure_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def model(tiny: Path):
    return AutoModelForCausalLM.from_pretrained(tiny).eval()


def test_tiny_loads_with_auto_classes_as_llama(tiny: Path, tokenizer, model) -> None:
    config = AutoConfig.from_pretrained(tiny)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert type(model).__name__ == "LlamaForCausalLM"


def test_tiny_uses_grouped_query_attention(tiny: Path) -> None:
    config = AutoConfig.from_pretrained(tiny)
    assert config.num_key_value_heads < config.num_attention_heads


def test_tiny_has_between_one_and_ten_million_parameters(model) -> None:
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000


def test_same_seed_gives_identical_files(tiny: Path, tmp_path: Path) -> None:
    again = build_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name


def test_different_seed_gives_different_weights(tiny: Path, tmp_path: Path) -> None:
    other = build_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_build_leaves_no_temporary_folders(tmp_path: Path) -> None:
    build_checkpoint(tmp_path / "ckpt", preset="tiny", seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_tokenizer_round_trips_plain_ascii(tokenizer) -> None:
    text = "The river is cold today, and 42 people went home."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_prepends_bos(tokenizer) -> None:
    ids = tokenizer("hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_tokenizer_vocab_fits_in_embedding_table(tiny: Path, tokenizer) -> None:
    assert len(tokenizer) <= AutoConfig.from_pretrained(tiny).vocab_size


def test_special_token_ids_match_config_json(tiny: Path, tokenizer) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert tokenizer.pad_token_id == config["pad_token_id"]


def test_chat_template_applies_after_reload(tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith(tokenizer.bos_token)
    assert "hi" in prompt and "be brief" in prompt
    assert prompt.endswith("<|assistant|>\n")


def test_chat_template_omits_assistant_header_without_generation_prompt(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not prompt.endswith("<|assistant|>\n")


def test_ensure_checkpoint_builds_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    real_build = demo_models._build_in_temp

    def counting_build(*args, **kwargs):
        builds.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(demo_models, "_build_in_temp", counting_build)
    first = ensure_checkpoint(tmp_path, preset="tiny", seed=0)
    second = ensure_checkpoint(tmp_path, preset="tiny", seed=0)
    assert first == second == tmp_path / "tiny-seed0"
    assert len(builds) == 1
    assert AutoConfig.from_pretrained(second).model_type == "llama"


def test_greedy_generate_returns_ids_within_vocab(tokenizer, model) -> None:
    inputs = tokenizer("The river is cold", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = out[0, inputs.input_ids.shape[1] :]
    assert new.shape == (8,)
    assert int(new.min()) >= 0 and int(new.max()) < model.config.vocab_size
