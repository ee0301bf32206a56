"""The CPU kernels' SiLU-and-multiply alone against PyTorch's eager silu and mul, on the `small`
preset's MLP shape (intermediate size 2048), for a decode batch and prompt-sized row counts: the
best of 20 calls each, in microseconds and elements per second.

It times the kernel of whichever tree `engine` is imported from, so two trees compare in one run:

    PYTHONPATH=../base .venv/bin/python loadtest/bench_fused_ops.py   # the tree ../base's kernel
    PYTHONPATH=. .venv/bin/python loadtest/bench_fused_ops.py         # this tree's
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from engine.kernels import cpu_kernels

INTERMEDIATE = 2048
ROWS = (24, 256, 1024)  # a decode batch, a prompt, a full chunk


def best_of(fn, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def eager_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=1)
    return F.silu(gate) * up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.load():
        raise SystemExit("the CPU kernels did not build on this machine")
    fused = torch.ops.sluice_cpu.silu_and_mul
    rows = []
    for n in ROWS:
        x = torch.randn(n, 2 * INTERMEDIATE, generator=torch.Generator().manual_seed(0)).to(
            getattr(torch, args.dtype)
        )
        for name, fn in (("sluice_cpu::silu_and_mul", fused), ("eager silu * up", eager_silu_and_mul)):
            seconds = best_of(lambda fn=fn, x=x: fn(x))
            rows.append(
                {
                    "rows": n,
                    "op": name,
                    "us": round(seconds * 1e6, 1),
                    "G elements/s": round(n * INTERMEDIATE / seconds / 1e9, 2),
                }
            )
    print(f"{'rows':>5}  {'op':<26} {'us':>9} {'G elements/s':>13}")
    for r in rows:
        print(f"{r['rows']:>5}  {r['op']:<26} {r['us']:>9} {r['G elements/s']:>13}")
    print(json.dumps({"threads": args.threads, "dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
