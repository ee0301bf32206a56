"""Runtime: what every rank derives from the EngineConfig and the checkpoint's facts, by one rule.

The engine's rank 0 (LLMEngine) and a rank started on another machine
(`python -m engine.executor`) both call `resolve_model_spec(config, checkpoint)`, so the same
options give the same attention backend, KV block size and quantisation plan on every rank;
rank 0 hands its ModelSpec to the ranks it spawns. `resolve_dtype` turns dtype "auto" into the
dtype this machine computes best in.

Whether the CPU paged kernel serves a model is decided here too, once per start: from the
options (kv_cache_dtype, block_size), the model's architecture (soft-capped logits, attention
sinks) and whether the kernel builds on this machine; never per layer or per step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from engine.config import ATTENTION_BACKENDS, EngineConfig, EngineConfigError
from engine.kernels import cpu_features, cpu_kernels
from engine.layers import attention_backends
from engine.loader.checkpoint import CheckpointInfo
from engine.quant import QuantPlan, make_plan

log = logging.getLogger(__name__)

FLASH_PAGE_SIZE = 256  # FlashAttention-2 reads pages of a multiple of this many tokens
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Runtime:
    # "flash", "triton", "cpu" or "sdpa": config.attention_backend with "auto" resolved
    attention_backend: str
    block_size: int  # tokens per KV-cache block: config.block_size, else 16 (256 with flash)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What every rank builds its model and KV cache from, resolved once on rank 0 and handed
    down (plain data: it travels in a spawned worker's arguments)."""

    checkpoint: CheckpointInfo  # the folder's facts, read once (no tokenizer: it stays on rank 0)
    quant_plan: QuantPlan  # each rank quantises its own shard by it
    attention_backend: str
    block_size: int


def resolve_model_spec(config: EngineConfig, checkpoint: CheckpointInfo) -> ModelSpec:
    """The runtime and the quantisation plan for this checkpoint: ValueError (QuantizationError,
    EngineConfigError) for options that cannot run here, before anything loads."""
    runtime = resolve_runtime(config, traits=model_traits(checkpoint))
    # the plan's device check (fp8) looks at the configured device: ranks share its type
    quant_plan = make_plan(config, checkpoint.hf_config, torch.device(config.device))
    return ModelSpec(checkpoint, quant_plan, runtime.attention_backend, runtime.block_size)


@dataclass(frozen=True, slots=True)
class ModelTraits:
    """What a model's architecture asks of attention, known from its class before it is loaded."""

    has_sinks: bool = False  # a learned sink logit per head (GPT-OSS): not flash, not the CPU kernel
    soft_caps: bool = False  # soft-capped attention logits (Gemma 2): not the CPU kernel


def model_traits(checkpoint: CheckpointInfo) -> ModelTraits:
    """What the checkpoint's model class says of its attention (DecoderForCausalLM's hooks)."""
    return ModelTraits(
        has_sinks=checkpoint.has_attention_sinks,
        soft_caps=checkpoint.model_class.soft_caps_attention(checkpoint.hf_config),
    )


def resolve_runtime(config: EngineConfig, *, traits: ModelTraits) -> Runtime:
    """Resolve the backend for the config's device type, kv_cache_dtype and model (its traits:
    model_traits), then the block size.

    Raises ValueError (EngineConfigError for the block size and the CPU kernel) when the options
    cannot run here. Looks at which packages are installed and, on CPU, builds (or finds built)
    the C++ kernel; it does not look at the device itself.
    """
    device = torch.device(config.device.split(":")[0])  # the type only: ranks use different indices
    backend = select_backend(
        config.attention_backend, device, config.kv_cache_dtype, traits, config.block_size
    )
    default_block_size = FLASH_PAGE_SIZE if backend == "flash" else DEFAULT_BLOCK_SIZE
    block_size = config.block_size or default_block_size
    if backend == "flash" and block_size % FLASH_PAGE_SIZE:
        raise EngineConfigError(
            f"FlashAttention needs block_size to be a multiple of {FLASH_PAGE_SIZE}, got {block_size}"
        )
    return Runtime(backend, block_size)


def select_backend(
    name: str,
    device: torch.device,
    kv_cache_dtype: str = "auto",
    traits: ModelTraits = ModelTraits(),
    block_size: int | None = None,
) -> str:
    """Resolve "auto": on CUDA flash-attn when importable (not for a model with attention sinks),
    else the Triton decode kernel when Triton is importable, else SDPA; on CPU our C++ paged
    kernel ("cpu") where it builds and serves the model, else SDPA (saying why once); SDPA with
    an fp8 KV cache (which only SDPA reads)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "flash" and traits.has_sinks:
        raise ValueError(
            "attention_backend 'flash' cannot run attention sinks (the model's per-head `sinks`, "
            "GPT-OSS): flash-attn 2 has no sink logits; use attention_backend 'triton' or 'sdpa'"
        )
    if name == "flash":
        if kv_cache_dtype == "fp8":
            raise ValueError(
                "kv_cache_dtype 'fp8' needs attention_backend 'sdpa': flash-attn 2 reads fp16/bf16 only"
            )
        if device.type != "cuda":
            raise ValueError("attention_backend 'flash' needs a CUDA device")
        if not attention_backends.flash_attn_available():
            raise ValueError(
                "attention_backend 'flash' needs the flash-attn package (pip install flash-attn)"
            )
        return name
    if name == "triton":
        if kv_cache_dtype == "fp8":
            raise ValueError(
                "kv_cache_dtype 'fp8' needs attention_backend 'sdpa': the Triton decode kernel reads unscaled caches"
            )
        if device.type == "cuda" and not attention_backends.triton_available():
            raise ValueError("attention_backend 'triton' needs the triton package")
    if name == "cpu":
        reason = _why_not_cpu_kernel(device, kv_cache_dtype, traits, block_size)
        if reason is not None:
            raise EngineConfigError(
                f"attention_backend 'cpu' cannot run: {reason}; use attention_backend 'sdpa' (or 'auto')"
            )
    if name == "auto":
        if device.type == "cpu":
            reason = _why_not_cpu_kernel(device, kv_cache_dtype, traits, block_size)
            if reason is None:
                return "cpu"
            log.info("attention backend: sdpa, not the CPU paged kernel: %s", reason)
            return "sdpa"
        if kv_cache_dtype == "fp8":
            return "sdpa"
        if attention_backends.flash_attn_available() and not traits.has_sinks:
            return "flash"
        return "triton" if attention_backends.triton_available() else "sdpa"
    return name


def _why_not_cpu_kernel(
    device: torch.device, kv_cache_dtype: str, traits: ModelTraits, block_size: int | None
) -> str | None:
    """Why the CPU paged kernel cannot serve this engine; None: it can. The options and the model
    first: a model the kernel cannot serve never waits for it to build."""
    if device.type != "cpu":
        return f"it runs on the CPU, and the device is {device.type!r}"
    reason = cpu_kernels.cannot_serve(
        kv_cache_dtype=kv_cache_dtype,
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        soft_caps=traits.soft_caps,
        has_sinks=traits.has_sinks,
    )
    if reason is None and not cpu_kernels.load():
        reason = f"the kernel is unavailable here ({cpu_kernels.failure()})"
    return reason


def resolve_dtype(config: EngineConfig) -> EngineConfig:
    """The config with dtype "auto" resolved: bfloat16 on CUDA and on CPUs with native bf16
    arithmetic (AVX512-BF16 or AMX tiles), float32 elsewhere (emulated bf16 is slower)."""
    if config.dtype != "auto":
        return config
    return dataclasses.replace(config, dtype="bfloat16" if has_native_bf16(config.device) else "float32")


def has_native_bf16(device: str) -> bool:
    return device.startswith("cuda") or cpu_features.has_native_bf16()
