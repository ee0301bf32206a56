"""SmoothQuant smoothing before W8A8 (`python -m engine.compress w8a8 --smooth TEXT`).

Smoothing changes no function the float model computes; alpha 0.5 balances each channel's
activation and weight ranges (so a second pass finds nothing to move); and where a model has
activation outlier channels, a smoothed W8A8 checkpoint is closer to the float model than an
unsmoothed one. The written folder is an ordinary compressed-tensors W8A8 checkpoint.
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
from engine.compress.__main__ import main as compress_main
from engine.compress.smooth import compute_smoothing, smoothing_scale
from engine.compress.w8a8 import compress_w8a8, quantize_rows
from engine.demo.checkpoints import ensure_checkpoint
from engine.evaluation.quality import compare, targets_for, teacher_forced_logits

TEXT = (Path(__file__).resolve().parents[2] / "loadtest" / "data" / "coriolanus.txt").read_text()
CALIBRATION = TEXT[:20_000]
HELD_OUT = TEXT[-20_000:]  # evaluation text the calibration never saw
SAMPLES, SEQ_LEN = 8, 128


def _rewritten(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint folder `src` with each tensor replaced by change(name, tensor)."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    save_file({name: change(name, t).contiguous() for name, t in tensors.items()}, dst / "model.safetensors")
    return dst


def _logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def smoothed_float(tiny_checkpoint, tmp_path_factory):
    smoothing = compute_smoothing(tiny_checkpoint, CALIBRATION, 0.5, SAMPLES, SEQ_LEN)
    return smoothing, _rewritten(tiny_checkpoint, tmp_path_factory.mktemp("s") / "smoothed", smoothing.apply)


def test_smoothing_moves_ranges_without_changing_what_the_float_model_computes(
    tiny_checkpoint, smoothed_float
):
    smoothing, folder = smoothed_float
    scales = torch.cat(list(smoothing.scales.values()))
    assert len(smoothing.scales) == 2 * 4  # two norms in each of tiny's 4 layers
    assert scales.max() / scales.min() > 1.3 and not torch.allclose(scales, torch.ones_like(scales))
    ids = [1, *range(40, 90)]
    torch.testing.assert_close(_logits(folder, ids), _logits(tiny_checkpoint, ids), rtol=1e-4, atol=1e-4)


def test_at_alpha_one_half_a_second_pass_finds_every_channel_balanced(smoothed_float):
    _, folder = smoothed_float
    again = compute_smoothing(folder, CALIBRATION, 0.5, SAMPLES, SEQ_LEN)
    for scale in again.scales.values():
        torch.testing.assert_close(scale, torch.ones_like(scale), rtol=1e-3, atol=1e-3)


def test_the_scale_is_the_papers_balance_of_activation_and_weight_maxima():
    a, w = torch.tensor([8.0, 1.0, 0.5]), torch.tensor([0.5, 2.0, 0.5])
    torch.testing.assert_close(smoothing_scale(a, w, 0.5), torch.tensor([4.0, 0.5**0.5, 1.0]))
    torch.testing.assert_close(smoothing_scale(a, w, 1.0), a)  # everything into the weights
    torch.testing.assert_close(smoothing_scale(a, w, 0.0), 1 / w)  # the weights' columns to 1


def test_a_smoothed_w8a8_folder_holds_the_smoothed_weights_codes(tiny_checkpoint, smoothed_float, tmp_path):
    smoothing, smoothed = smoothed_float
    out = tmp_path / "w8a8"
    config = compress_w8a8(tiny_checkpoint, out, smoothing=smoothing)
    written, float_smoothed = load_file(out / "model.safetensors"), load_file(smoothed / "model.safetensors")
    name = "model.layers.2.mlp.up_proj"
    codes, scale = quantize_rows(
        smoothing.apply(f"{name}.weight", load_file(tiny_checkpoint / "model.safetensors")[f"{name}.weight"])
    )
    assert torch.equal(written[f"{name}.weight"], codes) and torch.equal(
        written[f"{name}.weight_scale"], scale
    )
    norm = "model.layers.2.post_attention_layernorm.weight"
    assert torch.equal(written[norm], float_smoothed[norm])  # the norms are written smoothed, float
    assert config == json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]


def _with_outlier_channels(src: Path, dst: Path) -> Path:
    """`src` with activation outliers, as trained LLMs have: a few channels of every norm's output
    50x larger, the layers they feed scaled down to match (the float function is unchanged)."""
    channels = torch.tensor([3, 17, 40])

    def change(name: str, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensor[channels] *= 50
        elif name.endswith(
            ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
        ):
            tensor[:, channels] /= 50
        return tensor

    return _rewritten(src, dst, change)


@pytest.mark.slow
def test_smoothing_brings_w8a8_closer_to_the_float_model_where_activations_have_outliers(
    tiny_checkpoint, tmp_path
):
    outliers = _with_outlier_channels(tiny_checkpoint, tmp_path / "outliers")
    plain, smoothed = tmp_path / "plain", tmp_path / "smoothed"
    compress_w8a8(outliers, plain)
    compress_main(
        [
            "w8a8",
            str(outliers),
            str(smoothed),
            "--smooth",
            _text_file(tmp_path),
            "--samples",
            str(SAMPLES),
            "--seq-len",
            str(SEQ_LEN),
        ]
    )

    def engine(folder):
        return LLMEngine(
            EngineConfig(model=str(folder), dtype="float32", num_kv_blocks=64, attention_backend="sdpa")
        )

    reference = engine(outliers)
    ids = reference.tokenizer.encode(HELD_OUT)[:501]
    targets, ref_logits = targets_for(ids, 250), teacher_forced_logits(reference, ids, 250)
    kl = {
        folder.name: compare(
            ref_logits, teacher_forced_logits(engine(folder), ids, 250), targets
        ).kl_divergence
        for folder in (plain, smoothed)
    }
    assert kl["smoothed"] < 0.5 * kl["plain"], kl


def _text_file(tmp_path: Path) -> str:
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION, encoding="utf-8")
    return str(path)


def test_families_with_other_norms_and_bad_settings_are_refused_by_name(
    model_cache, tiny_checkpoint, tmp_path
):
    gemma = ensure_checkpoint(model_cache, preset="tiny-gemma2")
    with pytest.raises(ValueError, match="not Gemma2ForCausalLM"):
        compute_smoothing(gemma, CALIBRATION)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        compute_smoothing(tiny_checkpoint, CALIBRATION, alpha=1.5)
    with pytest.raises(ValueError, match="no tokens"):
        compute_smoothing(tiny_checkpoint, "")
    with pytest.raises(SystemExit) as exit_info:
        compress_main(
            ["w8a8", str(tiny_checkpoint), str(tmp_path / "out"), "--smooth", str(tmp_path / "missing.txt")]
        )
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
