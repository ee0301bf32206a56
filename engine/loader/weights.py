"""Builds an engine model from a Hugging Face checkpoint folder, streaming its safetensors.

Tensors are read one at a time (safe_open memory-maps the file), copied into the model's
parameters through their `weight_loader`, and dropped: peak host memory is one tensor, not
the checkpoint. Every error names the file, and the tensor where there is one.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.layers.embed_head import lm_heads
from engine.layers.tp import get_tp_size
from engine.loader.checkpoint import (
    CheckpointInfo,
    ModelLoadError,
    model_class_of,
    pretrained_config,
    read_config_json,
)
from engine.models.base import DecoderForCausalLM
from engine.quant.plan import (
    NO_QUANTIZATION,
    QuantPlan,
    checkpoint_tensor_claimers,
    claim_checkpoint_tensor,
    finalize_model,
    prepare_model,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 5  # names quoted in a missing-tensor message


class WeightLoadError(ModelLoadError):
    """The checkpoint's tensors cannot fill the model; the message names the file."""


def build_model(
    checkpoint: CheckpointInfo | str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    quant_plan: QuantPlan = NO_QUANTIZATION,
) -> DecoderForCausalLM:
    """The checkpoint's model with its weights, in `dtype` on `device`, in eval mode.

    `checkpoint`: its facts as the engine read them (config.json is not read again), or a folder
    whose config.json is read here (a tool or test that loads a model alone). With a quantisation
    plan the model is built and loaded on the host, its linear layers converted there
    (engine.quant), and only then moved to `device`.
    """
    if isinstance(checkpoint, CheckpointInfo):
        folder, config_json = Path(checkpoint.folder), checkpoint.config_json
    else:
        folder = Path(checkpoint)
        config_json = read_config_json(folder)
    model_class = model_class_of(folder, config_json.get("architectures"))
    config = pretrained_config(folder, config_json)
    # Parameters are allocated directly on the device, in the target dtype, uninitialised:
    # load_weights then fills every one of them or fails.
    build_device = "cpu" if quant_plan.is_active else device
    with _default_dtype(dtype), torch.device(build_device):
        model = model_class(config)
    prepare_model(model, quant_plan)
    load_weights(model, folder)
    if quant_plan.is_active:
        try:
            heads = lm_heads(model) if quant_plan.lm_head else []
            finalize_model(model, quant_plan, torch.device(device), heads)
        except ValueError as e:  # a layer's method found the loaded weights unusable
            raise WeightLoadError(f"{folder}: {e}") from None
    return model.eval()


@torch.no_grad()
def load_weights(model: DecoderForCausalLM, folder: str | Path) -> None:
    """Copy every tensor of the checkpoint in `folder` into `model`'s parameters.

    Reads `model.safetensors`, or else the shards listed in `model.safetensors.index.json`.
    Raises WeightLoadError unless each parameter (each shard of a packed one) was filled
    and each tensor was used or is one the model's family ignores (its
    `ignored_checkpoint_tensors`); the model is then partly loaded and must not be used.
    The model's checkpoint hooks (DecoderForCausalLM) say how its names map.
    """
    folder = Path(folder)
    params = dict(model.named_parameters())  # tied weights appear once, under embed_tokens
    mapping = model.packed_modules_mapping
    tied = model.tie_word_embeddings
    ignored = [re.compile(pattern) for pattern in model.ignored_checkpoint_tensors]
    claimers = checkpoint_tensor_claimers(model)  # layers of a pre-quantised checkpoint
    seen: set[str] = set()
    unknown: list[str] = []
    for path in _checkpoint_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for file_name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    name = model.checkpoint_name(file_name)  # a wrapper's prefixes, a family's names
                    if _is_ignored(name, ignored, tied) or model.is_other_stage_weight(name):
                        continue
                    # mixture of experts: per-expert tensors -> (stacked parameter, shard id)
                    param_name, shard_id = model.expert_tensor(name) or _param_name(name, mapping)
                    if param_name not in params and _claim(
                        claimers, param_name, shard_id, f, path, file_name
                    ):
                        seen.add(name)
                        continue
                    if param_name not in params:
                        unknown.append(f"{file_name} ({path.name})")
                        continue
                    tensor = _checkpoint_tensor(f, file_name, params[param_name])
                    _copy(params[param_name], tensor, shard_id, path, file_name)
                    seen.add(name)
        except (OSError, SafetensorError) as e:
            raise WeightLoadError(f"{path}: not a readable safetensors file ({e})") from None
    _check_complete(folder, params, mapping, model.expert_sources, seen, unknown)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Whole-tensor copy, for parameters without a layer-specific loader (norms)."""
    if param.shape != loaded_weight.shape:
        raise ValueError(f"has shape {tuple(loaded_weight.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def _checkpoint_files(folder: Path) -> list[Path]:
    # model.safetensors wins over an index, as in transformers' from_pretrained.
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if not index.is_file():
        raise WeightLoadError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightLoadError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    absent = [path.name for path in files if not path.is_file()]
    if absent:
        raise WeightLoadError(f"{index}: lists shards missing from {folder}: {', '.join(absent)}")
    return files


def _is_ignored(name: str, ignored: list[re.Pattern], tied: bool) -> bool:
    # lm_head.weight of a tied model: the head is the embedding, loaded from embed_tokens.
    return (tied and name == "lm_head.weight") or any(pattern.search(name) for pattern in ignored)


def _param_name(name: str, mapping: dict) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, shard id or None): q_proj -> (qkv_proj, "q")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in mapping:
            packed, shard_id = mapping[part]
            return ".".join([*parts[:i], packed, *parts[i + 1 :]]), shard_id
    return name, None


def _checkpoint_tensor(f, name: str, param: nn.Parameter):
    # Tensor parallel: a layer's loader narrows the tensor to this rank's part, and reading only
    # that part (safetensors' get_slice) keeps the other ranks' parts out of this rank's memory.
    if get_tp_size() > 1 and hasattr(param, "weight_loader"):
        return _CheckpointSlice(f.get_slice(name))
    return f.get_tensor(name)


class _CheckpointSlice:
    """A checkpoint tensor not read yet: `narrow` reads only the part it returns.

    `rows` narrows dim 0 without reading: a fused checkpoint tensor (Phi-3's qkv_proj) is
    split into its projections this way before each rank reads its part of each.
    """

    def __init__(self, lazy_slice, row_start: int = 0, num_rows: int | None = None) -> None:
        self._slice = lazy_slice
        shape = list(lazy_slice.get_shape())
        self._row_start = row_start
        shape[0] = shape[0] - row_start if num_rows is None else num_rows
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)

    def rows(self, start: int, length: int) -> _CheckpointSlice:
        return _CheckpointSlice(self._slice, self._row_start + start, length)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * self.dim()
        index[0] = slice(self._row_start, self._row_start + self.shape[0])
        offset = self._row_start if dim == 0 else 0
        index[dim] = slice(offset + start, offset + start + length)
        return self._slice[tuple(index)]


def _copy(param: nn.Parameter, tensor: torch.Tensor, shard_id, path: Path, name: str) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        if shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
    except ValueError as e:  # the loaders' shape checks: "has shape (a, b), expected (c, d)"
        raise WeightLoadError(f"{path}: tensor {name!r} {e}") from None


def _claim(claimers: dict, param_name: str, shard_id, f, path: Path, name: str) -> bool:
    try:
        return claim_checkpoint_tensor(claimers, param_name, shard_id, lambda: f.get_tensor(name))
    except ValueError as e:
        raise WeightLoadError(f"{path}: tensor {name!r} {e}") from None


def _check_complete(
    folder: Path,
    params: dict[str, nn.Parameter],
    mapping: dict,
    expert_sources,
    seen: set[str],
    unknown: list[str],
) -> None:
    problems = []
    missing = sorted(_expected_names(params, mapping, expert_sources) - seen)
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        problems.append(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {listed}")
    if unknown:
        problems.append(
            f"checkpoint has {len(unknown)} tensor(s) the model does not use: {', '.join(unknown)}"
        )
    if problems:
        raise WeightLoadError(f"{folder}: {'; '.join(problems)}")


def _expected_names(params: dict[str, nn.Parameter], mapping: dict, expert_sources) -> set[str]:
    """The HF tensor names that fill `params`: a packed parameter needs each of its sources, a
    stacked expert parameter each expert's tensors (the model's `expert_sources`)."""
    sources: dict[str, list[str]] = {}
    for source, (packed, _) in mapping.items():
        sources.setdefault(packed, []).append(source)
    names = set()
    for param_name in params:
        experts = expert_sources(param_name)
        if experts is not None:
            names.update(experts)
            continue
        parts = param_name.split(".")
        hits = [i for i, part in enumerate(parts) if part in sources]
        if not hits:
            names.add(param_name)
            continue
        i = hits[0]
        names.update(".".join([*parts[:i], source, *parts[i + 1 :]]) for source in sources[parts[i]])
    return names


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Process-wide setting: build models from one thread at a time.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
