"""bfloat16 matmuls on a CPU: PyTorch's own against float32 compute on bfloat16 weights, by rows.

Where oneDNN has no bfloat16 path (AVX2-only CPUs, or AVX-512 capped off with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2), PyTorch's
bfloat16 matmul is a dot product per row; this table chose engine.layers.packed_linear's
MIN_WIDENED_ROWS. Best of 25 calls, milliseconds:

    .venv/bin/python loadtest/bench_bf16_matmul.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from engine.kernels import cpu_features

SHAPES = [(2304, 768), (4096, 768), (768, 2048)]  # the `small` preset's qkv, gate_up and down
ROWS = [1, 2, 4, 8, 16, 32, 128, 512]


def best_ms(fn, repeats: int = 25) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"{cpu_features.describe()}, {torch.get_num_threads()} threads; ms, best of 25")
    print("| weight | " + " | ".join(f"rows {r}" for r in ROWS) + " |")
    print("|---|" + "---:|" * len(ROWS))
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features).bfloat16()
        inputs = [torch.randn(rows, in_features).bfloat16() for rows in ROWS]
        plain = [best_ms(lambda x=x, w=weight: F.linear(x, w)) for x in inputs]
        widened = [best_ms(lambda x=x, w=weight: F.linear(x.float(), w.float()).bfloat16()) for x in inputs]
        name = f"{out_features}x{in_features}"
        print(f"| {name}, bfloat16 matmul | " + " | ".join(f"{t:.3f}" for t in plain) + " |")
        print(f"| {name}, float32 on bf16 weights | " + " | ".join(f"{t:.3f}" for t in widened) + " |")


if __name__ == "__main__":
    main()
