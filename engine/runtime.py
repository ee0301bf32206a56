"""Runtime: what every rank derives from the EngineConfig alone, by one rule.

The engine's rank 0 (LLMEngine) and a rank started on another machine
(`python -m engine.distributed`) both call `resolve_runtime(config)`, so the same options
give the same attention backend and KV block size on every rank; `resolve_dtype` turns
dtype "auto" into the dtype this machine computes best in.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig, EngineConfigError
from engine.layers.attention_backends import select_backend
from engine.models import MODEL_REGISTRY

FLASH_PAGE_SIZE = 256  # FlashAttention-2 reads pages of a multiple of this many tokens
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Runtime:
    attention_backend: str  # "flash", "triton" or "sdpa": config.attention_backend with "auto" resolved
    block_size: int  # tokens per KV-cache block: config.block_size, else 16 (256 with flash)


def resolve_runtime(config: EngineConfig) -> Runtime:
    """Resolve the backend for the config's device type and kv_cache_dtype, then the block size.

    Raises ValueError (EngineConfigError for the block size) when the options cannot run here.
    Looks at which packages are installed, not at the device itself.
    """
    device = torch.device(config.device.split(":")[0])  # the type only: ranks use different indices
    has_sinks = _model_has_attention_sinks(config.model)
    backend = select_backend(config.attention_backend, device, config.kv_cache_dtype, has_sinks)
    default_block_size = FLASH_PAGE_SIZE if backend == "flash" else DEFAULT_BLOCK_SIZE
    block_size = config.block_size or default_block_size
    if backend == "flash" and block_size % FLASH_PAGE_SIZE:
        raise EngineConfigError(
            f"FlashAttention needs block_size to be a multiple of {FLASH_PAGE_SIZE}, got {block_size}"
        )
    return Runtime(backend, block_size)


def resolve_dtype(config: EngineConfig) -> EngineConfig:
    """The config with dtype "auto" resolved: bfloat16 on CUDA and on CPUs with native bf16
    arithmetic (AVX512-BF16 or AMX tiles), float32 elsewhere (emulated bf16 is slower)."""
    if config.dtype != "auto":
        return config
    return dataclasses.replace(config, dtype="bfloat16" if has_native_bf16(config.device) else "float32")


def has_native_bf16(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def _model_has_attention_sinks(folder: str) -> bool:
    """Whether the checkpoint's architecture has attention sinks (GPT-OSS), which flash-attn
    cannot run; False where config.json cannot be read (loading reports that)."""
    try:
        architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return False
    classes = [MODEL_REGISTRY[name] for name in architectures or [] if name in MODEL_REGISTRY]
    return bool(classes) and bool(getattr(classes[0], "has_attention_sinks", False))
