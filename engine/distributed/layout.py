"""Checks that a model can be split the way EngineConfig asks, before any process starts."""

from __future__ import annotations

from engine.config import EngineConfig, EngineConfigError


def check_parallel_layout(config: EngineConfig, hf_config: dict) -> None:
    """Raise EngineConfigError naming the option and the model dimension that does not divide."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    checks = [
        ("num_attention_heads", heads),
        ("intermediate_size", hf_config["intermediate_size"]),
        ("vocab_size", hf_config["vocab_size"]),
    ]
    for name, value in checks:
        if value % tp:
            raise EngineConfigError(f"tensor_parallel_size={tp} must divide the model's {name} ({value})")
    # fewer KV heads than ranks: each KV head is replicated on tp / kv_heads ranks
    if kv_heads % tp and tp % kv_heads:
        raise EngineConfigError(
            f"tensor_parallel_size={tp} and the model's num_key_value_heads ({kv_heads}): "
            "one must divide the other"
        )
    if config.expert_parallel:
        _check_experts(tp, hf_config)
    layers = hf_config["num_hidden_layers"]
    if pp > layers:
        raise EngineConfigError(
            f"pipeline_parallel_size={pp} is more than the model's num_hidden_layers ({layers})"
        )
    if config.world_size > 1 and config.device.startswith("cuda"):
        _check_gpus(config)


def _check_experts(tp: int, hf_config: dict) -> None:
    # Mixtral and GPT-OSS name the count num_local_experts, Qwen3-MoE num_experts
    name = next((n for n in ("num_local_experts", "num_experts") if hf_config.get(n)), None)
    if name is None:
        raise EngineConfigError("expert_parallel needs a mixture-of-experts model: this one has no experts")
    if hf_config[name] % tp:
        raise EngineConfigError(
            f"expert_parallel: tensor_parallel_size={tp} must divide the model's {name} ({hf_config[name]})"
        )


def _check_gpus(config: EngineConfig) -> None:
    import torch

    if ":" in config.device:
        raise EngineConfigError(
            f"device={config.device!r} names one GPU; with tensor/pipeline parallelism use "
            "device='cuda': rank r runs on cuda:r"
        )
    local_world_size = local_world_size_of(config)
    available = torch.cuda.device_count()
    if available < local_world_size:
        raise EngineConfigError(
            f"tensor_parallel_size * pipeline_parallel_size = {config.world_size} needs "
            f"{local_world_size} GPUs on this machine, {available} visible"
        )


def local_world_size_of(config: EngineConfig) -> int:
    """Ranks on this machine: LOCAL_WORLD_SIZE when set (multi-node), else the whole world."""
    import os

    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        return config.world_size
    try:
        local = int(value)
    except ValueError:
        raise EngineConfigError(f"LOCAL_WORLD_SIZE must be an integer, got {value!r}") from None
    if not 1 <= local <= config.world_size:
        raise EngineConfigError(f"LOCAL_WORLD_SIZE={local} must be in [1, {config.world_size}]")
    return local
