"""Build small Llama-family checkpoints locally, deterministically, for tests and demos.

No model hub is reachable from where Sluice is built and tested, yet the engine
must be exercised through exactly the path users take: a Hugging Face checkpoint
folder loaded with ``AutoConfig``/``AutoTokenizer``/``AutoModelForCausalLM``.
This module manufactures such folders from a seed: random weights plus a
byte-level BPE tokenizer trained on a built-in corpus. The same seed always
gives byte-identical files, so tests can compare outputs across runs.

``tiny`` (~5M parameters) is for unit tests; ``small`` (~125M) is for benchmarks. The other
``tiny-*`` presets cover the rest of the Llama family the engine serves: Mistral's sliding
window, Qwen2's q/k/v biases, multi-query attention with tied embeddings, Llama 3 rope scaling.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine.demo_tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer


@dataclasses.dataclass(frozen=True)
class Preset:
    """Architecture of a generated checkpoint; maps onto the config class's kwargs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    # Above Llama's 0.02 default: at 0.02 random logits are near-uniform and greedy
    # decoding collapses into one- or two-token loops, hiding KV-cache/batching bugs.
    initializer_range: float = 0.05
    architecture: str = "LlamaForCausalLM"  # a key of _ARCHITECTURES
    # Further config fields (sliding window, biases, tying, rope scaling); override defaults.
    options: dict[str, object] = dataclasses.field(default_factory=dict)
    # Transformers initialises norm weights to 1 and biases to 0, so a norm or bias loaded
    # into the wrong place would not change the logits; random values make it show.
    random_norms_and_biases: bool = False

    def config_kwargs(self) -> dict[str, object]:
        shape = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_CONFIG}
        return {**shape, **self.options}


_NOT_CONFIG = ("architecture", "options", "random_norms_and_biases")

_TINY = Preset(256, 4, 8, 2, 688, 4096, 2048)

PRESETS: dict[str, Preset] = {
    "tiny": _TINY,
    "small": Preset(768, 12, 12, 4, 2048, 32000, 4096),
    # Llama-3.2-1B's shapes (our 32k tokenizer): the GPU benchmark's checkpoint, built on the GPU machine.
    "gpu-1b": Preset(2048, 16, 32, 8, 8192, 32000, 4096),
    # sliding_window 16 < a 40-token test prompt, so the window masks something.
    "tiny-mistral": dataclasses.replace(
        _TINY,
        architecture="MistralForCausalLM",
        options={"sliding_window": 16},
        random_norms_and_biases=True,
    ),
    # q/k/v biases are implied by Qwen2; layers >= max_window_layers (2, 3) slide, 0 and 1 do not.
    "tiny-qwen2": dataclasses.replace(
        _TINY,
        architecture="Qwen2ForCausalLM",
        options={
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
        },
        random_norms_and_biases=True,
    ),
    "tiny-mqa": dataclasses.replace(
        _TINY,
        num_key_value_heads=1,
        options={"tie_word_embeddings": True, "attention_bias": False},
        random_norms_and_biases=True,
    ),
    # original_max_position_embeddings 64: wavelengths < 16 kept, > 64 divided by 8, between
    # smoothed, so all three llama3 branches touch this head_dim's 16 frequencies. MHA, and
    # attention_bias/mlp_bias to cover the biases Llama allows.
    "tiny-llama3": dataclasses.replace(
        _TINY,
        num_key_value_heads=8,
        options={
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "attention_bias": True,
            "mlp_bias": True,
        },
        random_norms_and_biases=True,
    ),
}

_ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": (MistralConfig, MistralForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
}

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


def _init_model(spec: Preset, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    config_class, model_class = _ARCHITECTURES[spec.architecture]
    defaults = {
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "architectures": [spec.architecture],
    }
    config = config_class(**{**defaults, **spec.config_kwargs()})
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
            param.normal_(1.0, 0.2)
        elif name.endswith(".bias"):
            param.normal_(0.0, std)


if __name__ == "__main__":
    main()
