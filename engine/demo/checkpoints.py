"""Build small checkpoints of every family the engine serves, locally and deterministically.

No model hub is reachable from where Sluice is built and tested, yet the engine
must be exercised through exactly the path users take: a Hugging Face checkpoint
folder loaded with ``AutoConfig``/``AutoTokenizer``/``AutoModelForCausalLM``.
This module manufactures such folders from a seed: random weights plus a
byte-level BPE tokenizer trained on a built-in corpus. The same seed always
gives byte-identical files, so tests can compare outputs across runs.

``tiny`` (~5M parameters) is for unit tests; ``small`` (~125M) is for benchmarks; the
``tiny-*`` presets cover each family and its options (engine/demo/presets.py lists them; engine/demo/architectures.py names their Transformers classes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel

from engine.demo.architectures import ARCHITECTURES
from engine.demo.presets import PRESETS, Preset
from engine.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

__all__ = ["PRESETS", "build_checkpoint", "build_weightless_checkpoint", "ensure_checkpoint"]


# Files whose presence means a published folder is complete (publication is atomic);
# plus the weights: one model.safetensors, or the index of a sharded checkpoint.
_REQUIRED_FILES = ("config.json", "tokenizer.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def build_checkpoint(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    seed: int = 0,
    torch_dtype: str = "float32",
    max_shard_size: str | None = None,
) -> Path:
    """Build a checkpoint folder at ``out_dir``, replacing any existing one.

    With ``max_shard_size`` (e.g. "2MB") the weights are split into shards listed in
    ``model.safetensors.index.json``, as large published checkpoints are.
    """
    out = Path(out_dir)
    tmp = _build_in_temp(out, preset, seed, torch_dtype, max_shard_size)
    _publish(tmp, out, replace=True)
    return out


def ensure_checkpoint(cache_root: str | os.PathLike[str], preset: str = "tiny", seed: int = 0) -> Path:
    """Return the cached checkpoint for (preset, seed), building it only if missing.

    Safe under concurrent callers: each builds privately and the first rename wins.
    """
    out = Path(cache_root) / f"{preset}-seed{seed}"
    if _is_complete(out):
        return out
    tmp = _build_in_temp(out, preset, seed, "float32")
    _publish(tmp, out, replace=False)
    return out


def build_weightless_checkpoint(out_dir: str | os.PathLike[str], preset: str, seed: int = 0) -> Path:
    """A preset's folder without its weights: config.json and the tokenizer as ensure_checkpoint
    writes them, and a model.safetensors that holds no tensors. For tests of what the engine reads
    from a folder's files at every preset's size (gpu-1b's weights alone are 4 GB in float32);
    loading a model from it fails on the first missing tensor."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _preset_config(spec)
    config.dtype = torch.float32  # as ensure_checkpoint's float32 weights record it
    config.save_pretrained(out)
    train_tokenizer(spec.vocab_size, spec.max_position_embeddings, seed).save_pretrained(out)
    save_file({}, out / "model.safetensors")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="torch dtype of saved weights")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    parser.add_argument("--max-shard-size", help="shard the weights, e.g. 2MB (default: one file)")
    args = parser.parse_args(argv)
    print(build_checkpoint(args.out, args.preset, args.seed, args.dtype, args.max_shard_size))


def _build_in_temp(
    out: Path, preset: str, seed: int, torch_dtype: str, max_shard_size: str | None = None
) -> Path:
    """Write the whole checkpoint into a hidden sibling folder and return it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    dtype = getattr(torch, torch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {torch_dtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Sibling, not /tmp, so the final rename stays on one filesystem and is atomic.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        tokenizer = train_tokenizer(spec.vocab_size, spec.max_position_embeddings, seed)
        model = _init_model(spec, seed, dtype)
        # Not passed when unset, so unsharded output stays byte-identical to earlier builds.
        shard_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp, safe_serialization=True, **shard_kwargs)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move ``tmp`` to ``out``; if another builder got there first, keep theirs."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
    try:
        # A folder without the required files is debris, never a concurrent build:
        # builds only ever appear at ``out`` complete, by rename.
        if replace or (out.exists() and not _is_complete(out)):
            _move_aside(out, old)
        os.rename(tmp, out)
    except OSError:
        # Lost a race: ``out`` now exists (non-empty dirs cannot be renamed over).
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(out):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _move_aside(out: Path, old: Path) -> None:
    # FileNotFoundError: someone else moved it first; nothing left to clear.
    with contextlib.suppress(FileNotFoundError):
        out.rename(old)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES) and any(
        (folder / name).is_file() for name in _WEIGHT_FILES
    )


def _preset_config(spec: Preset) -> PretrainedConfig:
    config_class, _ = ARCHITECTURES[spec.architecture]
    defaults = {
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "architectures": [spec.architecture],
    }
    return config_class(**{**defaults, **spec.config_kwargs()})


def _init_model(spec: Preset, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    config = _preset_config(spec)
    _, model_class = ARCHITECTURES[spec.architecture]
    # Seeding immediately before construction makes the weights a function of the seed.
    torch.manual_seed(seed)
    model = model_class(config)
    if spec.random_norms_and_biases:
        _randomize_norms_and_biases(model, spec.initializer_range)
    return model.to(dtype).eval()


@torch.no_grad()
def _randomize_norms_and_biases(model: PreTrainedModel, std: float) -> None:
    # Continues the seeded generator, so the values are a function of the seed too.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            # Gemma's norms scale by (1 + weight): centred on 0 they scale by about 1 too
            param.normal_(0.0 if _is_one_centred_norm(model) else 1.0, 0.2)
        elif name.endswith((".bias", "_bias")):  # "_bias": GPT-OSS's stacked expert biases
            param.normal_(0.0, std)
        elif name.endswith(".sinks"):  # GPT-OSS's attention sinks: large enough to matter
            param.normal_(0.0, 1.0)


def _is_one_centred_norm(model: PreTrainedModel) -> bool:
    return model.config.model_type.startswith("gemma")
