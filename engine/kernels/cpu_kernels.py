"""CPU kernels of ours in C++ (engine/kernels/csrc): paged attention and the fused elementwise ops.

Paged attention (paged_attention.cpp): one call per layer and step serves every sequence of the
step, prompt chunks and decode rows alike: each attends over its cached context read in place from the paged KV cache (no page
gather, no per-sequence Python loop), the query heads sharing a KV head read each page once, and
the softmax is flash attention's online one in float32. vLLM's CPU backend does the same with
its own C++ kernels; PyTorch's CPU SDPA (flash) kernel reached ~60 GFLOP/s on this project's
2-core machine for prompts of 64-512 tokens, and the compiled decode kernel read the context
three times (engine.kernels.paged_decode).

Fused ops (fused_ops.cpp): RMSNorm with its residual add, rotary embedding (in place) and
SiLU-and-multiply, each one pass rounding where PyTorch's eager ops round; the layers call them
when the model runner sets their `fused` flag (engine option cpu_fused_ops).

Built once per machine with the C++ compiler torch.compile also needs (torch's
cpp_extension: cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), for the
CPU's vector width (and AVX512-BF16's bfloat16 dot products where the CPU has them). Where it cannot be built, `load()` says why in the log and returns False:
the SDPA backend then runs its portable path. Not used for fp8 caches, soft-capped logits or
attention sinks (the SDPA backend's explicit path serves those).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from engine.kernels import cpu_features

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_attention.cpp", CSRC / "fused_ops.cpp"]
HEADERS = sorted(CSRC.glob("*.h"))  # hashed with the sources: a changed header rebuilds
KEY_TILE = 16  # the kernel reads pages 16 keys at a time: the page size must be a multiple
_NO_WINDOW = 0

_loaded: bool | None = None  # None: not tried yet


def _vector_flags() -> tuple[str, list[str]]:
    """The extension's name suffix and compiler flags for this CPU's widest vector ISA that torch
    detects: one build per ISA, so a cache shared by different machines never runs code a CPU
    lacks."""
    capability = cpu_features.vector_isa()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = {
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2"],
        "AVX2": ["-mavx2", "-mfma"],
    }.get(capability, [])
    if cpu_features.has_avx512_bf16():
        # bfloat16 dot products (vdpbf16ps): prompt attention's scores in half the instructions
        return "avx512bf16", [*flags, "-mavx512bf16"]
    return capability.lower(), flags


def load() -> bool:
    """Build (or find built) and load the kernel; False where it cannot run here."""
    global _loaded
    if _loaded is None:
        _loaded = _build()
    return _loaded


def _build() -> bool:
    from torch.utils import cpp_extension

    isa, flags = _vector_flags()
    # the sources' hash in the name: two checkouts of different code never share a build folder
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES + HEADERS)).hexdigest()[:12]
    try:
        _put_ninja_on_path()
        cpp_extension.load(
            name=f"sluice_cpu_{isa}_{digest}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("SLUICE_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # no compiler, no headers, a failed build: the portable path serves
        log.warning("CPU kernels unavailable (%s: %s); using PyTorch's ops", type(e).__name__, e)
        return False
    log.info("CPU kernels loaded (%s)", isa)
    return True


def _put_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; the ninja wheel (a dependency) puts it next to the
    # interpreter, which is not on PATH when the venv's python runs without activation
    import ninja

    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def eligible(layer) -> bool:
    """Whether the kernel can run this layer: a CPU float cache with pages of a multiple of 16
    keys, and no soft-cap or sinks."""
    cache = layer.k_cache
    return (
        cache.device.type == "cpu"
        and cache.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and cache.shape[1] % KEY_TILE == 0
        and not layer.logits_soft_cap
        and getattr(layer, "sinks", None) is None
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]: the step's queries, sequences end to end
    k_cache: torch.Tensor,  # [num_blocks, S, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, n] int32
    cu_query_lens: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32: tokens in the cache, this step's included
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """[T, H, D] in q's dtype: each sequence's queries are its context's last positions, causal
    (and within the sliding window, where the layer has one)."""
    return torch.ops.sluice_cpu.paged_attention(
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, scale, sliding_window or _NO_WINDOW
    )


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) as engine.layers.norm computes them; without a
    residual the second is empty."""
    return torch.ops.sluice_cpu.rms_norm(x, residual, weight, eps, gemma)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> F.silu(gate) * up."""
    return torch.ops.sluice_cpu.silu_and_mul(x)


def rotary_(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
    """Rotates x [T, heads, D] in place by cos_sin [P, D] (float32) at positions [T] (int64)."""
    torch.ops.sluice_cpu.rotary_(x, cos_sin, positions)
