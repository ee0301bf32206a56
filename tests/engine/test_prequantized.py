"""A folder saved by transformers with a bitsandbytes quantization_config loads without re-quantising.

transformers quantises a checkpoint with bitsandbytes on CPU (it needs the accelerate
package for that, a test dependency) and saves it; the engine then takes its int8/4-bit
tensors as they are. The tiny checkpoint's projections are whole multiples of bitsandbytes'
64-value blocks, so quantising the float checkpoint at load gives the very same codes: the
two engines must agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine import EngineConfig, LLMEngine, ModelLoadError, SamplingParams
from engine.quant import QuantizationError

PROMPTS = [[1, 17, 99, 4, 250], [1, *range(10, 70)]]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _save_prequantised(src: Path, dst: Path, mode: str) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def _engine(folder: Path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(folder), kv_cache_memory_gib=0.05, **options))


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def _logits(engine: LLMEngine) -> torch.Tensor:
    model = engine.runner.model
    with torch.inference_mode():
        ids = torch.tensor(PROMPTS[1])
        return model.compute_logits(model(ids, torch.arange(len(ids))))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_prequantised_folder_round_trips_without_requantising(tiny_checkpoint, tmp_path, mode):
    folder = _save_prequantised(tiny_checkpoint, tmp_path / mode, mode)
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
        == "bitsandbytes"
    )
    prequantised = _engine(folder)  # quantization "none": the checkpoint's own mode applies
    qkv = prequantised.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.name == mode
    assert len(qkv.bnb_shards) == 3  # q, k and v as the checkpoint holds them
    on_the_fly = _engine(tiny_checkpoint, quantization=mode)
    assert _greedy(prequantised) == _greedy(on_the_fly)
    torch.testing.assert_close(_logits(prequantised), _logits(on_the_fly), atol=1e-4, rtol=1e-4)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor(Q_PROJ)
    shard = qkv.bnb_shards[0]
    int8_state = getattr(shard, "state", None)  # Linear8bitLt moves its codes there on first use
    loaded = int8_state.CB if int8_state is not None and int8_state.CB is not None else shard.weight.data
    assert torch.equal(loaded.view(stored.dtype).reshape(stored.shape), stored)  # the very bytes


def test_prequantised_folder_refuses_another_mode(tiny_checkpoint, tmp_path):
    folder = _save_prequantised(tiny_checkpoint, tmp_path / "int8", "int8")
    with pytest.raises(QuantizationError, match="already quantised as 'int8'"):
        _engine(folder, quantization="nf4")


def test_checkpoint_quantised_by_another_method_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="quantised with 'gptq'; only bitsandbytes"):
        _engine(folder)


def test_prequantised_folder_missing_a_statistic_names_the_projection(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _save_prequantised(tiny_checkpoint, tmp_path / "nf4", "nf4")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError, match=r"projection 1: the pre-quantised checkpoint lacks weight\.absmax"
    ):
        _engine(folder)
