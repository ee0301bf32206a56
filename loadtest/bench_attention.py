"""The CPU paged attention kernel alone, on the `small` preset's attention shape (12 query heads,
4 KV heads, head size 64): a decode step, prompts, and prompt chunks over cached context, in
float32 and bfloat16, the best of 15 calls each (milliseconds, one thread by default).

It times the kernel of whichever tree `engine` is imported from, so two trees compare in one run:

    PYTHONPATH=../base .venv/bin/python loadtest/bench_attention.py   # the tree ../base's kernel
    PYTHONPATH=. .venv/bin/python loadtest/bench_attention.py         # this tree's

`ATEN_CPU_CAPABILITY=avx2` (engine.kernels.cpu_features) times the AVX2 variant on an AVX-512 CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.kernels import cpu_kernels

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 12, 4, 64, 16
CASES = {  # name: (context length, query length) per sequence
    "decode 24 x ~500": [(300 + 17 * i, 1) for i in range(24)],
    "prompt 4 x 256": [(256, 256)] * 4,
    "chunk 2 x 128 over 384": [(512, 128)] * 2,
}


def make_step(seqs: list[tuple[int, int]], dtype: torch.dtype, num_blocks: int = 2048) -> tuple:
    """The kernel's arguments for these sequences, their pages scattered over the pool."""
    gen = torch.Generator().manual_seed(0)
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(*shape, generator=gen).to(dtype)
    v_cache = torch.randn(*shape, generator=gen).to(dtype)
    width = max(-(-context // BLOCK_SIZE) for context, _ in seqs)
    tables = torch.randperm(num_blocks, generator=gen)[: len(seqs) * width].view(len(seqs), width).int()
    query_lens = torch.tensor([query for _, query in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).int()
    q = torch.randn(int(cu[-1]), HEADS, HEAD_DIM, generator=gen).to(dtype)
    context_lens = torch.tensor([context for context, _ in seqs], dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, context_lens


def best_ms(step: tuple, calls: int) -> float:
    for _ in range(5):  # warm: pages in cache, scratch allocated
        cpu_kernels.paged_attention(*step, HEAD_DIM**-0.5, None)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        cpu_kernels.paged_attention(*step, HEAD_DIM**-0.5, None)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    if not cpu_kernels.load():
        raise SystemExit(f"the CPU kernels cannot be built here: {cpu_kernels.failure()}")
    torch.set_num_threads(args.threads)
    result: dict[str, object] = {"variant": cpu_kernels._vector_flags()[0], "threads": args.threads}
    for dtype in (torch.float32, torch.bfloat16):
        for name, seqs in CASES.items():
            result[f"{name} {str(dtype).removeprefix('torch.')} ms"] = round(
                best_ms(make_step(seqs, dtype), args.calls), 3
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
