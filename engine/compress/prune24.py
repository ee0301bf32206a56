"""Magnitude 2:4 semi-structured pruning of a checkpoint's linear layers.

In every group of four consecutive input features of a projection's weight the two
smallest magnitudes become zero (the pattern NVIDIA's sparse tensor cores run). The result
is a normal checkpoint folder (same tensor names, dtypes and shards) whose config.json
carries a `sluice_sparsity` marker; the engine then runs the pruned layers through PyTorch's
semi-structured sparse kernels on CUDA where it can (engine.quant.sparse24).
Pruning without retraining costs quality; loadtest/bench_quant.py measures how much.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.loader.checkpoint import check_checkpoint_folder

# The Llama family's decoder projections (Transformers' names); embeddings and lm_head stay dense.
PRUNABLE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARKER = "sluice_sparsity"


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] (in divisible by 4) -> the same with the 2 smallest |w| of each 4 zeroed."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(
            f"2:4 pruning needs a 2-D weight with a multiple of 4 columns, got {tuple(weight.shape)}"
        )
    groups = weight.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


def prune_checkpoint(src: str | Path, dst: str | Path, skip_modules: tuple[str, ...] = ()) -> dict:
    """Write a 2:4-pruned copy of checkpoint folder `src` to `dst` (a new folder); returns the marker."""
    src, dst = Path(src), Path(dst)
    config = check_checkpoint_folder(src)
    if MARKER in config:
        raise ValueError(f"{src}: already pruned ({config[MARKER]})")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new output folder")
    dst.mkdir(parents=True)
    pruned = []
    for path in sorted(src.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = f.get_tensor(name)
                if _is_target(name, skip_modules):
                    tensor = prune_2_4(tensor)
                    pruned.append(name)
                tensors[name] = tensor.contiguous()
        save_file(tensors, str(dst / path.name), metadata={"format": "pt"})
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, dst / path.name)
    marker = {
        "format": "2:4",
        "method": "magnitude",
        "num_pruned_tensors": len(pruned),
        "skip_modules": list(skip_modules),
    }
    (dst / "config.json").write_text(json.dumps({**config, MARKER: marker}, indent=2) + "\n")
    return marker


def _is_target(name: str, skip_modules: tuple[str, ...]) -> bool:
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in PRUNABLE_PROJECTIONS:
        return False
    return not any(f".{s}." in f".{name}." for s in skip_modules)
