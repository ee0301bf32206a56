"""The engine on every x86 kind we run on, whatever kind runs the suite.

An AVX-512 machine runs the paths of an AVX2-only one (AMD Zen 2/3, many Intel CPUs) when PyTorch,
oneDNN and MKL are capped to AVX2 (`engine.kernels.cpu_features`): a child process started so builds the
AVX2 variant of our C++ kernels, finds no oneDNN bfloat16 path, and must still give Transformers'
greedy tokens in float32 and bfloat16. On an AVX2-only machine the caps change nothing, and the
same assertions hold; the suite's other tests there read the same features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Inductor's cache key leaves the caps out: kernels it compiled for this CPU uncapped crash a capped
# process (seen as segfaults in compiled decode attention), so capped runs keep a cache of their own.
AVX2_INDUCTOR_CACHE = Path(tempfile.gettempdir()) / "torchinductor-avx2-capped"

_CHILD = r"""
import json, sys
import torch
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import cpu_features
from engine.kernels import cpu_kernels
from engine.layers.linear import LinearBase
from engine.executor.runtime import resolve_dtype
from tests.engine.transformers_greedy import transformers_greedy

folder = sys.argv[1]
prompts = [[1, 7, 9, 11, 13], [1, *range(20, 52)]]  # 5 and 33 rows: both bfloat16 matmul paths
report = {
    "isa": cpu_features.vector_isa(),
    "onednn_bf16": cpu_features.onednn_has_bf16(),
    "auto_dtype": resolve_dtype(EngineConfig(model=folder)).dtype,
    "kernel_variant": cpu_kernels._vector_flags()[0],
    "kernel_loaded": cpu_kernels.load(),
}
for dtype in ("float32", "bfloat16"):
    expected = transformers_greedy(folder, getattr(torch, dtype), prompts, 8)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with LLMEngine(EngineConfig(model=folder, dtype=dtype)) as engine:
        report[dtype] = {
            "tokens": [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)],
            "expected": expected,
            "methods": sorted({m.quant_method.name for m in engine.runner.model.modules() if isinstance(m, LinearBase)}),
            "attention_backend": engine.attention_backend,
        }
print("REPORT " + json.dumps(report))
"""


def _capped_env() -> dict[str, str]:
    """This process's environment capped to AVX2, with an inductor cache of its own."""
    return {
        **os.environ,
        **AVX2_CAPS,
        "TORCHINDUCTOR_CACHE_DIR": str(AVX2_INDUCTOR_CACHE),
        "PYTHONPATH": str(REPO_ROOT),
    }


@pytest.fixture(scope="module")
def as_avx2(tiny_checkpoint) -> dict:
    """What an engine in a child process capped to AVX2 reports: features, kernel, tokens."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_checkpoint)],
        env=_capped_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORT "))


def test_capped_to_avx2_the_engine_sees_an_avx2_cpu_without_native_bfloat16(as_avx2):
    assert as_avx2["isa"] == "AVX2"
    assert as_avx2["onednn_bf16"] is False  # packing bfloat16 would raise here
    assert as_avx2["auto_dtype"] == "float32"  # bfloat16 would run at the float32 rate at best


def test_the_avx2_variant_of_the_cpu_kernels_builds_and_serves_attention(as_avx2):
    assert as_avx2["kernel_variant"] == "avx2" and as_avx2["kernel_loaded"]
    assert as_avx2["float32"]["attention_backend"] == as_avx2["bfloat16"]["attention_backend"] == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_an_avx2_cpu_greedy_tokens_equal_transformers(as_avx2, dtype):
    run = as_avx2[dtype]
    assert run["tokens"] == run["expected"]


def test_on_an_avx2_cpu_bfloat16_weights_stay_unpacked_and_float32_ones_are_packed(as_avx2):
    assert as_avx2["bfloat16"]["methods"] == ["bf16-fp32-compute"]
    # float32: tiny's weights of 2**18 elements and more (gate/up, the head) are packed, its
    # smaller ones stay with F.linear (engine.layers.packed_linear)
    assert as_avx2["float32"]["methods"] == ["none", "onednn-packed"]


@pytest.mark.slow
def test_the_avx2_attention_kernel_passes_the_kernels_own_tests(as_avx2):
    # 8-lane vectors, loops sized for 16 ymm registers, 32-row prompt tiles: the AVX2 variant is
    # other code than the AVX-512 one, so it meets every float64 reference check that one meets
    assert as_avx2["kernel_variant"] == "avx2"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "tests/engine/test_cpu_attention.py",
            "-k",
            "not the_engine_uses and not an_engine_where",
        ],
        env=_capped_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
