"""Write a float checkpoint as a compressed-tensors W8A8 int8 checkpoint (the format llm-compressor
writes and vLLM, Transformers and Sluice read).

Each decoder projection's weight [N, K] becomes int8 codes `<name>.weight` in [-127, 127] and a
scale per output row `<name>.weight_scale` [N, 1] in the checkpoint's dtype (w ~= w_q * scale,
the scale rounded to that dtype before the codes are taken, so the pair is self-consistent);
config.json gets a `quantization_config` saying: weights int8 symmetric per channel, input
activations int8 symmetric per token, dynamic. Embeddings, norms and lm_head stay as they are.
The codes and scales are engine.quant.w8a8's own, so this folder loads to the same layers as the
float one with `quantization: w8a8`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.compress.prune24 import PRUNABLE_PROJECTIONS
from engine.compress.smooth import Smoothing
from engine.loader.checkpoint import check_checkpoint_folder
from engine.quant.w8a8 import WEIGHT_MAX, check_fused_groups

# the Llama family's projections, and Phi-3's fused ones (quantised whole: per row is per row)
PROJECTIONS = (*PRUNABLE_PROJECTIONS, "qkv_proj", "gate_up_proj")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def quantization_config(ignore: list[str]) -> dict:
    """config.json's `quantization_config` for W8A8 int8 (llm-compressor's W8A8 scheme, dynamic)."""
    args = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**args, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**args, "strategy": "token", "dynamic": True, "observer": None},
                "output_activations": None,
            }
        },
        "ignore": ["lm_head", *ignore],
        "kv_cache_scheme": None,
    }


def quantize_rows(
    weight: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (codes [N, K] int8, scale [N, 1] in `scale_dtype`, default weight's dtype)
    with weight ~= codes * scale."""
    w = weight.float()
    amax = torch.linalg.vector_norm(w, float("inf"), dim=1, keepdim=True).clamp(min=1e-12)
    scale = (amax / WEIGHT_MAX).to(scale_dtype or weight.dtype)
    codes = torch.round(w / scale.float()).clamp(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)
    return codes, scale


def compress_w8a8(
    src: str | Path, dst: str | Path, skip_modules: tuple[str, ...] = (), smoothing: Smoothing | None = None
) -> dict:
    """Write a W8A8 copy of checkpoint folder `src` to `dst` (a new folder); returns its
    quantization_config. With `smoothing` (engine.compress.smooth.compute_smoothing on `src`) the
    norms and the projections they feed are smoothed first, in float32, then quantised."""
    src, dst = Path(src), Path(dst)
    config = check_checkpoint_folder(src)
    if "quantization_config" in config:
        raise ValueError(f"{src}: already quantised ({config['quantization_config'].get('quant_method')})")
    if any(config.get(key) for key in _MOE_KEYS):
        raise ValueError(
            f"{src}: a mixture-of-experts checkpoint; W8A8 checkpoints are written for dense models only"
        )
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new output folder")
    dst.mkdir(parents=True)
    ignored, weight_map = [], {}
    for path in sorted(src.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = f.get_tensor(name)
                dtype = tensor.dtype
                if smoothing is not None:  # float32 where it changes the tensor
                    tensor = smoothing.apply(name, tensor)
                target = _target(name)
                if target and any(f".{s}." in f".{name}." for s in skip_modules):
                    ignored.append(target)  # still smoothed: the norm before it is
                elif target:
                    tensor, tensors[f"{target}.weight_scale"] = quantize_rows(tensor, dtype)
                tensors[name] = (tensor if tensor.dtype == torch.int8 else tensor.to(dtype)).contiguous()
        save_file(tensors, str(dst / path.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, path.name))
    check_fused_groups(ignored)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, dst / path.name)
    index = dst / "model.safetensors.index.json"
    if index.is_file():  # the shards hold new tensors (the scales): list them
        contents = json.loads(index.read_text())
        index.write_text(json.dumps({**contents, "weight_map": weight_map}, indent=2) + "\n")
    quant = quantization_config(sorted(ignored))
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**raw, "quantization_config": quant}, indent=2) + "\n")
    return quant


def _target(name: str) -> str | None:
    """The module name of a projection's weight tensor, else None."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS:
        return ".".join(parts[:-1])
    return None
