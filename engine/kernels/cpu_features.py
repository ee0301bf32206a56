"""What this CPU computes natively, as PyTorch and oneDNN see it: read from its features, never
from its name.

x86 machines differ in the ways that decide the engine's CPU paths: AVX-512 or only AVX2 (AMD
Zen 2/3, many Intel laptops and servers), bfloat16 dot products (AVX512-BF16, AMX) or none (there
bfloat16 runs at the float32 rate at best), and whether oneDNN has a bfloat16 matmul at all
(AVX-512 or AVX-NE-CONVERT; without either, packing a bfloat16 weight raises).

Every answer follows the caps PyTorch and oneDNN honour: `ATEN_CPU_CAPABILITY=avx2` and
`ONEDNN_MAX_CPU_ISA=AVX2` (with `MKL_ENABLE_INSTRUCTIONS=AVX2`) make an AVX-512 machine take the
paths an AVX2-only one takes, which is how the suite is run as an AVX2 machine would run it
(docs/development.md#cpu-kinds).
"""

from __future__ import annotations

import torch


def vector_isa() -> str:
    """The widest vector ISA PyTorch's kernels use here: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def has_avx512_bf16() -> bool:
    """bfloat16 dot products in AVX-512 registers (vdpbf16ps), where AVX-512 is in use."""
    return vector_isa() == "AVX512" and bool(torch.cpu._is_avx512_bf16_supported())


def has_native_bf16() -> bool:
    """Whether bfloat16 arithmetic is native (AVX512-BF16 or AMX tiles), so faster than float32.

    AMX machines all have AVX-512; with AVX-512 capped off neither counts."""
    return has_avx512_bf16() or (vector_isa() == "AVX512" and bool(torch.cpu._is_amx_tile_supported()))


def onednn_has_bf16() -> bool:
    """Whether oneDNN can run (and pack for) bfloat16 matmuls on this CPU: it needs AVX-512
    (AVX512BW/VL/DQ) or AVX-NE-CONVERT; elsewhere PyTorch's own bfloat16 matmul serves."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe() -> str:
    """One line for logs and benchmark rows: the ISA in use and the bfloat16 facts."""
    return (
        f"isa={vector_isa()} native_bf16={has_native_bf16()} onednn_bf16={onednn_has_bf16()} "
        f"amx={bool(torch.cpu._is_amx_tile_supported())}"
    )
