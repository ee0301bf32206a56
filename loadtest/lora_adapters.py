"""Random LoRA adapters of a checkpoint for the benchmarks, written as ordinary PEFT folders.

Each folder holds `adapter_config.json` and `adapter_model.safetensors` as
`PeftModel.save_pretrained` writes them, so Sluice and vLLM load the same files. Every adapter
targets all seven projections of every layer (q/k/v/o, gate/up/down) at rank `r`; A and B are
both drawn at random (PEFT starts B at zero, which would leave the output unchanged), scaled so
the adapter changes the greedy tokens without swamping the base model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ensure_adapters(checkpoint: Path, cache_root: Path, count: int, rank: int = 16) -> dict[str, Path]:
    """`count` adapters of `checkpoint` (name -> folder), built once under `cache_root` and reused."""
    shapes = _projection_shapes(checkpoint)
    adapters = {}
    for index in range(count):
        name = f"lora-{index}"
        folder = cache_root / f"{checkpoint.name}-r{rank}-{index}"
        if not (folder / "adapter_model.safetensors").is_file():
            _write_adapter(folder, checkpoint, shapes, rank, seed=index + 1)
        adapters[name] = folder
    return adapters


def _projection_shapes(checkpoint: Path) -> dict[str, tuple[int, int]]:
    """Hugging Face module name ("model.layers.0.self_attn.q_proj") -> its weight's [out, in]."""
    files = sorted(checkpoint.glob("*.safetensors"))
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                module, _, leaf = key.rpartition(".")
                if leaf == "weight" and module.rsplit(".", 1)[-1] in TARGET_MODULES:
                    out_size, in_size = f.get_slice(key).get_shape()
                    shapes[module] = (out_size, in_size)
    if not shapes:
        raise SystemExit(f"{checkpoint}: no q/k/v/o or gate/up/down projection weights to adapt")
    return shapes


def _write_adapter(folder: Path, checkpoint: Path, shapes: dict, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_size, in_size) in sorted(shapes.items()):
        # A: [r, in], B: [out, r]; x @ A^T has entries of about 0.5, the update about 0.05 * scaling
        a = torch.randn(rank, in_size, generator=generator) * (0.5 / in_size**0.5)
        b = torch.randn(out_size, rank, generator=generator) * (0.05 / rank**0.5)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(checkpoint),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": TARGET_MODULES,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fanout": False,
        "inference_mode": True,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    try:
        os.rename(tmp, folder)  # atomic: a concurrent builder's folder wins, ours is dropped
    except OSError:
        for file in tmp.iterdir():
            file.unlink()
        tmp.rmdir()
