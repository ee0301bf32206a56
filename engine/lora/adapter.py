"""A PEFT LoRA adapter folder read and checked: its rank, scaling and each target module's A and B.

A folder is what `PeftModel.save_pretrained` writes: adapter_config.json and
adapter_model.safetensors, whose tensors are named
`base_model.model.<module>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]). Only
plain LoRA on the attention and MLP projections is served; anything else (modules_to_save,
DoRA, per-module ranks, LoRA biases) is refused by name, as is a rank above max_lora_rank.
Shapes against the model are checked when the adapter meets it (engine.lora.slots).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Hugging Face projection names an adapter may target (our fused qkv_proj / gate_up_proj take
# q/k/v and gate/up as slices of their output)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


class LoRAError(ValueError):
    """An adapter that cannot be served; the message names the file, and the tensor where there is one."""


@dataclass(slots=True)
class LoRAAdapter:
    name: str
    folder: Path
    rank: int
    scaling: float  # lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
    # Hugging Face module name ("model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r]), float32
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(name: str, folder: str | Path, max_rank: int) -> LoRAAdapter:
    """Read and check the adapter `name` in `folder`; LoRAError says what is wrong and where."""
    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {config_file}: {e}") from None
    rank, scaling = _check_config(name, config_file, config, max_rank)
    try:
        tensors = load_file(weights_file)
    except (OSError, SafetensorError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {weights_file}: {e}") from None
    pairs: dict[str, list[torch.Tensor | None]] = {}
    for tensor_name, tensor in tensors.items():
        module, which = _split_name(tensor_name)
        if module is None or module.rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise LoRAError(
                f"LoRA adapter {name!r}: {weights_file}: tensor {tensor_name!r} is not a LoRA A or B "
                f"weight of a supported projection ({', '.join(TARGET_MODULES)})"
            )
        expected_rank_dim = 1 if which else 0
        if tensor.dim() != 2 or tensor.shape[expected_rank_dim] != rank:
            raise LoRAError(
                f"LoRA adapter {name!r}: {weights_file}: tensor {tensor_name!r} has shape "
                f"{tuple(tensor.shape)}; a rank-{rank} {'B' if which else 'A'} weight is "
                f"{'[out, r]' if which else '[r, in]'}"
            )
        pairs.setdefault(module, [None, None])[which] = tensor.float()
    for module, (a, b) in pairs.items():
        if a is None or b is None:
            missing = "lora_B" if b is None else "lora_A"
            raise LoRAError(
                f"LoRA adapter {name!r}: {weights_file}: {_PREFIX}{module}.{missing}.weight is missing"
            )
    if not pairs:
        raise LoRAError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    weights = {module: (a, b) for module, (a, b) in pairs.items()}
    return LoRAAdapter(name, folder, rank, scaling, weights)


def _check_config(name: str, config_file: Path, config: dict, max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from adapter_config.json; refuses what the engine does not serve."""

    def refuse(what: str) -> LoRAError:
        return LoRAError(f"LoRA adapter {name!r}: {config_file}: {what}")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config['peft_type']!r} is not LORA")
    if config.get("modules_to_save"):
        raise refuse(
            f"modules_to_save {config['modules_to_save']!r} is not supported (the adapter replaces whole "
            "modules, which a shared base model cannot do per request)"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise refuse(f"{key} (per-module ranks or alphas) is not supported")
    if config.get("use_dora"):
        raise refuse("use_dora (DoRA) is not supported")
    if config.get("bias", "none") != "none":
        raise refuse(f"bias {config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in TARGET_MODULES]
    if unknown:
        raise refuse(
            f"target_modules {unknown} are not supported; targets are among {', '.join(TARGET_MODULES)}"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise refuse(f"rank r={rank} is above max_lora_rank={max_rank}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise refuse(f"lora_alpha must be a positive number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scaling


def _split_name(tensor_name: str) -> tuple[str | None, int]:
    """`base_model.model.<module>.lora_A.weight` -> (module, 0); B -> 1; anything else (None, 0)."""
    if not tensor_name.startswith(_PREFIX):
        return None, 0
    for suffix, which in _SUFFIXES.items():
        if tensor_name.endswith(suffix):
            return tensor_name[len(_PREFIX) : -len(suffix)], which
    return None, 0
