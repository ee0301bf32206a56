"""resolve_runtime: one rule for the attention backend and KV block size, used by every entry point
(resolve_model_spec: with the quantisation plan, what rank 0 and a remote rank load by).

The CUDA cases need no GPU: the rule looks at the device type and at which packages are
installed, which these tests fake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, EngineConfigError, LLMEngine
from engine import llm_engine as llm_engine_module
from engine.executor import __main__ as remote_rank
from engine.executor import runtime
from engine.executor.runtime import ModelSpec, ModelTraits, Runtime, resolve_dtype, resolve_runtime
from engine.layers import attention_backends


@pytest.mark.parametrize(
    ("isa", "avx512_bf16", "amx", "expected"),
    [
        ("AVX512", True, False, "bfloat16"),
        ("AVX512", False, True, "bfloat16"),
        ("AVX512", False, False, "float32"),
        ("AVX2", False, False, "float32"),
        ("AVX2", True, True, "float32"),  # AVX-512 capped off (ATEN_CPU_CAPABILITY=avx2): as an AVX2 CPU
    ],
)
def test_dtype_auto_is_bfloat16_where_the_cpu_computes_it_natively(
    tiny_checkpoint, monkeypatch, isa, avx512_bf16, amx, expected
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype(EngineConfig(model=str(tiny_checkpoint))).dtype == expected


def test_dtype_auto_is_bfloat16_on_cuda_and_a_named_dtype_stays(tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "has_native_bf16", lambda device: False)
    assert resolve_dtype(EngineConfig(model=str(tiny_checkpoint), dtype="float16")).dtype == "float16"
    monkeypatch.undo()
    cuda = EngineConfig(model=str(tiny_checkpoint), device="cuda")
    assert resolve_dtype(cuda).dtype == "bfloat16"
    assert EngineConfig(model=str(tiny_checkpoint)).dtype == "auto"  # the default


def test_an_engine_runs_in_the_resolved_dtype(tiny_checkpoint) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), max_model_len=64))
    assert engine.config.dtype == resolve_dtype(EngineConfig(model=str(tiny_checkpoint))).dtype != "auto"
    assert engine.runner.dtype == getattr(torch, engine.config.dtype)


class _Captured(Exception):
    pass


@pytest.fixture
def flash_installed(monkeypatch) -> None:
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the parallel layout check's GPUs


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, Runtime("cpu", 16)),  # the project's machines build the CPU kernel (test_cpu_attention)
        ({"block_size": 32}, Runtime("cpu", 32)),
        ({"block_size": 4}, Runtime("sdpa", 4)),  # the CPU kernel reads pages of a multiple of 16
        ({"kv_cache_dtype": "fp8"}, Runtime("sdpa", 16)),
        ({"attention_backend": "sdpa"}, Runtime("sdpa", 16)),
        ({"device": "cuda"}, Runtime("flash", 256)),
        ({"device": "cuda:1", "block_size": 512}, Runtime("flash", 512)),
        ({"device": "cuda", "kv_cache_dtype": "fp8"}, Runtime("sdpa", 16)),
        ({"device": "cuda", "attention_backend": "sdpa"}, Runtime("sdpa", 16)),
    ],
)
def test_resolves_backend_and_block_size_from_the_options(flash_installed, options, expected) -> None:
    assert resolve_runtime(EngineConfig(**options), traits=ModelTraits()) == expected


def test_flash_with_a_block_size_not_a_multiple_of_256_is_refused(flash_installed) -> None:
    with pytest.raises(EngineConfigError, match="block_size to be a multiple of 256, got 16"):
        resolve_runtime(
            EngineConfig(device="cuda", attention_backend="flash", block_size=16), traits=ModelTraits()
        )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"block_size": 8},
        {"kv_cache_dtype": "fp8"},
        {"device": "cuda"},
        {"device": "cuda", "kv_cache_dtype": "fp8"},
        {"device": "cuda", "block_size": 512},
    ],
)
def test_rank_0_and_a_remote_rank_resolve_the_same_model_spec(
    flash_installed, tiny_checkpoint, tmp_path, monkeypatch, options
) -> None:
    """The same backend, block size, quantisation plan and checkpoint facts: rank 0 hands its
    spec to the ranks it spawns, a remote rank reads the folder itself and must agree."""
    config = {"model": str(tiny_checkpoint), "tensor_parallel_size": 2, **options}
    rank_0 = _rank_0_spec(config, monkeypatch)
    assert rank_0 == _remote_rank_spec(config, tmp_path, monkeypatch)
    assert rank_0.checkpoint.folder == str(tiny_checkpoint)


def _rank_0_spec(config: dict, monkeypatch) -> ModelSpec:
    """What LLMEngine hands its executor (stopped there: no worker starts)."""
    seen = []

    def executor(_config, spec):
        seen.append(spec)
        raise _Captured

    monkeypatch.setattr(llm_engine_module, "MultiprocExecutor", executor)
    with pytest.raises(_Captured):
        LLMEngine(EngineConfig(**config))
    return seen[0]


def _remote_rank_spec(config: dict, tmp_path: Path, monkeypatch) -> ModelSpec:
    """What `python -m engine.executor` hands join_and_load (stopped there: it joins nothing)."""
    seen = []

    def join_and_load(_config, spec, _rank, _local_rank, _address):
        seen.append(spec)
        raise _Captured

    monkeypatch.setattr(remote_rank, "join_and_load", join_and_load)
    (tmp_path / "engine.json").write_text(json.dumps(config))
    for name, value in {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(_Captured):
        remote_rank.main(["--config", str(tmp_path / "engine.json")])
    return seen[0]
