"""engine.compress: offline 2:4 magnitude pruning into a normal checkpoint folder, and loading it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from engine import EngineConfig, LLMEngine, ModelLoadError, SamplingParams
from engine.compress import prune_2_4, prune_checkpoint
from engine.compress.__main__ import main as compress_main
from engine.layers.packed_linear import FLOAT_METHOD_NAMES
from engine.quant.sparse24 import is_2to4_sparse


def test_prune_keeps_the_two_largest_magnitudes_of_every_four():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.25, 0.5]])
    assert prune_2_4(weight).tolist() == [[0.0, -3.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.5]]


def test_prune_refuses_a_width_not_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4 columns"):
        prune_2_4(torch.ones(2, 6))


@pytest.fixture(scope="module")
def pruned_checkpoint(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "tiny-2of4"
    prune_checkpoint(tiny_checkpoint, out, skip_modules=("layers.3",))
    return out


def test_pruned_folder_is_a_checkpoint_with_a_marker_and_2to4_projections(tiny_checkpoint, pruned_checkpoint):
    config = json.loads((pruned_checkpoint / "config.json").read_text())
    marker = config["sluice_sparsity"]
    assert marker["format"] == "2:4" and marker["skip_modules"] == ["layers.3"]
    assert marker["num_pruned_tensors"] == 3 * 7  # 7 projections in each of layers 0-2
    assert (pruned_checkpoint / "tokenizer.json").is_file()
    with (
        safe_open(str(pruned_checkpoint / "model.safetensors"), framework="pt") as pruned,
        safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as original,
    ):
        assert set(pruned.keys()) == set(original.keys())
        for name in pruned.keys():  # noqa: SIM118
            tensor = pruned.get_tensor(name)
            if name.endswith("proj.weight") and ".layers.3." not in name:
                assert is_2to4_sparse(tensor), name
            else:
                assert torch.equal(tensor, original.get_tensor(name)), name


def test_pruned_checkpoint_loads_dense_on_cpu_and_generates(pruned_checkpoint):
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(pruned_checkpoint), kv_cache_memory_gib=0.05))
    layers = engine.runner.model.model.layers
    assert layers[0].mlp.down_proj.quant_method.name == "sparse24"
    assert layers[0].mlp.down_proj.is_sparse24 is False  # CPU: dense kernels, same product
    assert "need CUDA" in layers[0].mlp.down_proj.sparse24_dense_reason
    assert layers[3].mlp.down_proj.quant_method.name in FLOAT_METHOD_NAMES  # left dense by the tool
    out = engine.generate(["The river"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8


def test_a_marked_checkpoint_whose_weights_are_not_2to4_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "fake"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sluice_sparsity"] = {"format": "2:4", "method": "magnitude", "skip_modules": []}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="marked 2:4-pruned but this layer's weight is not 2:4 sparse"):
        LLMEngine(EngineConfig(dtype="float32", model=str(folder), kv_cache_memory_gib=0.05))


def test_cli_refuses_an_existing_output_folder(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compress_main(["--model", str(tiny_checkpoint), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "exists; choose a new output folder" in capsys.readouterr().err


def test_cli_prunes_into_a_new_folder(tiny_checkpoint, tmp_path, capsys):
    compress_main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "p")])
    assert "pruned 28 weight tensors 2:4" in capsys.readouterr().out
