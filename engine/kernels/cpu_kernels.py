"""CPU kernels of ours in C++ (engine/kernels/csrc): paged attention and the fused elementwise ops.

Paged attention (paged_attention.cpp): one call per layer and step serves every sequence of the
step, prompt chunks and decode rows alike (the attention backend "cpu",
engine.layers.attention_backends): each attends over its cached context read in place from the
paged KV cache (no page gather, no per-sequence Python loop), the query heads sharing a KV head read each page once, and
the softmax is flash attention's online one in float32. vLLM's CPU backend does the same with
its own C++ kernels; PyTorch's CPU SDPA (flash) kernel reached ~60 GFLOP/s on this project's
2-core machine for prompts of 64-512 tokens, and the compiled decode kernel read the context
three times (engine.kernels.paged_decode).

Fused ops (fused_ops.cpp): RMSNorm with its residual add, rotary embedding (in place) and
SiLU-and-multiply, each one pass rounding where PyTorch's eager ops round; the layers call them
once engine.layers.fused_ops switches them on at build (engine option cpu_fused_ops).

The sources are x86 code: they include immintrin.h (AVX-512 and AVX512-BF16 intrinsics where the
CPU has them), so on any other machine (ARM, POWER: platform.machine()) `load()` returns False
without trying, saying so in the log once.

Built once per machine with the C++ compiler torch.compile also needs (torch's cpp_extension),
for the CPU's vector width (and AVX512-BF16's bfloat16 dot products where the CPU has them),
into a folder named after the vector ISA and a hash of the sources and torch's version, under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions): a build for another kind of CPU is
never used. A TORCH_EXTENSIONS_DIR this process cannot write to (the CPU image's, built with the
image) is read as it is where it holds the build for this CPU, and passed over for a folder under
the temporary directory where it does not. Where the kernels cannot be built, `load()` says why
in the log and returns False (`failure()` keeps the reason): attention_backend "auto" then
chooses "sdpa" and the layers keep PyTorch's ops. The paged kernel does not serve fp8 caches,
soft-capped logits, attention sinks or pages of other than a multiple of 16 keys
(`cannot_serve`): engine.executor.runtime chooses "sdpa" for such a model once, at start-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from engine.kernels import cpu_features

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_attention.cpp", CSRC / "fused_ops.cpp"]
HEADERS = sorted(CSRC.glob("*.h"))  # hashed with the sources: a changed header rebuilds
KEY_TILE = 16  # the kernel reads pages 16 keys at a time: the page size must be a multiple
_NO_WINDOW = 0

X86_MACHINES = ("x86_64", "amd64", "x64", "i386", "i686")  # platform.machine()'s names for x86

_loaded: bool | None = None  # None: not tried yet
_failure: str | None = None  # why the last try failed


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


def is_loaded() -> bool:
    """Whether `load()` has loaded the kernels in this process (never tries to build them)."""
    return bool(_loaded)


def load() -> bool:
    """Build (or find built) and load the kernels, once per process; False where they cannot run
    here, with the reason logged (once) and kept for `failure()`."""
    global _loaded, _failure
    if _loaded is None:
        _failure = _not_x86() or _build()
        _loaded = _failure is None
        if _failure is not None:
            log.warning("CPU kernels unavailable (%s); using PyTorch's ops", _failure)
    return _loaded


def failure() -> str | None:
    """Why `load()` returned False; None before it ran or when it succeeded."""
    return _failure


def cannot_serve(
    *,
    kv_cache_dtype: str = "auto",
    block_size: int = KEY_TILE,
    soft_caps: bool = False,
    has_sinks: bool = False,
) -> str | None:
    """Why the paged kernel cannot serve a model with these facts; None: it can. The kernel reads
    float caches (float32, bfloat16, float16) in pages of a multiple of 16 keys, and computes
    plain softmax attention."""
    if kv_cache_dtype == "fp8":
        return "kv_cache_dtype 'fp8' (the kernel reads unscaled float caches)"
    if block_size % KEY_TILE:
        return f"block_size {block_size} (the kernel reads pages of a multiple of {KEY_TILE} keys)"
    if soft_caps:
        return "the model soft-caps its attention logits (Gemma 2)"
    if has_sinks:
        return "the model has attention sinks (GPT-OSS)"
    return None


def is_x86() -> bool:
    """Whether this machine runs x86 code, the only kind the sources are written for."""
    return platform.machine().lower() in X86_MACHINES


def _not_x86() -> str | None:
    if is_x86():
        return None
    return f"the kernels are x86 code (immintrin.h) and this machine is {platform.machine() or 'unknown'}"


def _build() -> str | None:
    """None once built (or found built) and loaded; else what went wrong."""
    from torch.utils import cpp_extension

    isa, flags = _vector_flags()
    name = extension_name(isa)
    prebuilt = _read_only_build(name)
    try:
        if prebuilt is not None:
            torch.ops.load_library(str(prebuilt))
        else:
            _put_ninja_on_path()
            cpp_extension.load(
                name=name,
                sources=[str(path) for path in SOURCES],
                extra_cflags=["-O3", "-fopenmp", *flags],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                build_directory=_writable_build_folder(name),
                verbose=os.environ.get("SLUICE_VERBOSE_BUILD") == "1",
            )
    except Exception as e:  # no compiler, no headers, a failed build: the portable path serves
        return f"{type(e).__name__}: {e}"
    log.info("CPU kernels loaded (%s%s)", isa, f", built in advance: {prebuilt}" if prebuilt else "")
    return None


def extension_name(isa: str) -> str:
    """The library's name, and its build folder's: the ISA, and a hash of the sources (two
    checkouts of different code never share a build folder), of where they are (torch's build
    file names the sources by path: two checkouts of the same code sharing a folder each rebuilt
    it for their own paths, and one waited on the other's build lock for minutes) and of torch's
    version (a library found built is loaded as it is, _read_only_build)."""
    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    sources += str(CSRC.resolve()).encode() + torch.__version__.encode()
    return f"sluice_cpu_{isa}_{hashlib.sha256(sources).hexdigest()[:12]}"


def _read_only_build(name: str) -> Path | None:
    """The library built for these sources and this CPU's ISA in a TORCH_EXTENSIONS_DIR this process
    cannot write to (an image's, built with the image), loaded as it is: torch's builder would
    want to take a lock file there first."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    library = Path(root) / name / f"{name}.so" if root else None
    if library is not None and library.is_file() and not os.access(library.parent, os.W_OK):
        return library
    return None


def _writable_build_folder(name: str) -> str | None:
    """Where to build: None for torch's own choice (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions); a folder under the temporary directory where TORCH_EXTENSIONS_DIR
    is read-only (an image built on a CPU of another ISA than this one)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root or not Path(root).exists() or os.access(root, os.W_OK):
        return None
    folder = Path(tempfile.gettempdir()) / "torch_extensions" / name
    log.info("CPU kernels: none built for this CPU in the read-only %s; building in %s", root, folder)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _put_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH; the ninja wheel (a dependency) puts it next to the
    # interpreter, which is not on PATH when the venv's python runs without activation
    import ninja

    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


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


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of logits [N, V] float32 with -inf at the tokens each constrained row rows[i] (int64)
    does not allow: bit j of word w of bitmask[i] ([R, ceil(V / 32)] int32) allows token 32 * w + j."""
    return torch.ops.sluice_cpu.apply_token_bitmask(logits, rows, bitmask)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] float32 (rows contiguous) -> [N] int64: torch.argmax(x, dim=-1)'s answer in one
    vectorised pass per row."""
    return torch.ops.sluice_cpu.argmax_rows(x)
