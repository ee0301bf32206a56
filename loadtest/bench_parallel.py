"""Engine throughput under tensor and pipeline parallelism, against one process in the same run.

The standard workload (loadtest/bench_engine.py: 64 requests, prompts 32-512, outputs 16-128,
greedy, EOS ignored, `small` checkpoint) on each layout in turn: TP=1, TP=2 and PP=2 by
default. Prints output tokens/s per layout, the speedup over TP=1, and the scaling efficiency
(speedup / number of processes, 100% = linear). Every layout must produce the same tokens as
TP=1 (greedy), which the run checks.

    .venv/bin/python loadtest/bench_parallel.py --quick                 # tiny model, 8 requests: a smoke run
    .venv/bin/python loadtest/bench_parallel.py                         # CPU: TP=1, TP=2, PP=2
    .venv/bin/python loadtest/bench_parallel.py --device cuda --dtype bfloat16 --layouts 1x1 2x1 4x1 8x1 1x2 2x2

On CPU the ranks share the machine's cores, so expect little or no gain: the point there is
exactness and the cost of the communication. On a multi-GPU machine each rank has its GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams, ensure_demo_checkpoint  # noqa: E402
from engine.config import DTYPES  # noqa: E402
from loadtest.bench_engine import run_sluice  # noqa: E402
from loadtest.workloads import Row, Workload, standard_workload  # noqa: E402


def parse_layout(text: str) -> tuple[int, int]:
    """ "TPxPP", e.g. "2x1" -> (2, 1)."""
    try:
        tp, pp = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layout is TPxPP, e.g. 2x1, got {text!r}") from None
    if tp < 1 or pp < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return tp, pp


def run_layout(args, folder: Path, tp: int, pp: int, workload: Workload | None):
    config = EngineConfig(
        model=str(folder),
        dtype=args.dtype,
        device=args.device,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
    )
    with LLMEngine(config) as engine:
        workload = workload or standard_workload(engine.vocab_size, args.num_requests)
        row = run_sluice(engine, workload)
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens
        ]
        tokens = [o.token_ids for o in engine.generate(workload.prompts[:4], params[:4], use_tqdm=False)]
    row.mode = f"TP={tp} PP={pp}"
    return row, workload, tokens


def print_table(rows: list[tuple[Row, int]], workload: Workload, args) -> None:
    base = rows[0][0]
    print(
        f"\n{len(workload.prompts)} requests, {sum(map(len, workload.prompts))} prompt tokens, "
        f"{workload.num_output_tokens} output tokens, {args.preset}, {args.dtype} on {args.device}"
    )
    print(
        f"| {'layout':<12} | {'processes':>9} | {'seconds':>8} | {'output tok/s':>12} | {'speedup':>7} | {'efficiency':>10} |"
    )
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 9}|{'-' * 12}|")
    for row, world in rows:
        speedup = row.tokens_per_s / base.tokens_per_s
        print(
            f"| {row.mode:<12} | {world:>9} | {row.seconds:8.1f} | {row.tokens_per_s:12.1f} | "
            f"{speedup:6.2f}x | {speedup / world:10.0%} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny checkpoint, 8 requests: checks the path")
    parser.add_argument(
        "--preset", default=None, help="checkpoint preset (default: small, tiny with --quick)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 64, 8 with --quick")
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[(1, 1), (2, 1), (1, 2)])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=2.0, help="CPU: per rank")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "small")
    args.num_requests = args.num_requests or (8 if args.quick else 64)
    if args.layouts[0] != (1, 1):
        args.layouts.insert(0, (1, 1))  # the baseline every other layout is compared with
    if args.device.startswith("cuda"):
        largest = max(tp * pp for tp, pp in args.layouts)
        if torch.cuda.device_count() < largest:
            parser.error(f"the layouts need {largest} GPUs, {torch.cuda.device_count()} visible")

    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    rows, workload, reference = [], None, None
    for tp, pp in args.layouts:
        row, workload, tokens = run_layout(args, folder, tp, pp, workload)
        if reference is None:
            reference = tokens
        elif tokens != reference:
            raise SystemExit(f"TP={tp} PP={pp} generated other tokens than TP=1 PP=1")
        print(f"{row.mode}: {row.tokens_per_s:.1f} output tok/s", flush=True)
        rows.append((row, tp * pp))
    print_table(rows, workload, args)


if __name__ == "__main__":
    main()
