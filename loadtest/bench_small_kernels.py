"""Fixed costs of small kernels in a micro/decode step: oneDNN's packed call against F.linear
(engine.layers.packed_linear), and the greedy argmax (engine.executor.sampler.argmax).

  calls    each KxN weight, F.linear on the plain weight against oneDNN's packed call
           (torch.ops.mkldnn._linear_pointwise), microseconds per call at each row count, the best
           of 5 repeats on a warm primitive; and the cost of a packed call's first row count
           (oneDNN builds a primitive per row count it meets).
  engine   whole engines in one process, each with another MIN_PACKED_FLOAT32_WEIGHT (0: every
           float32 weight packed; the default; one above it), each warmed on the workload drawn
           with another seed, then the workload in alternating rounds (a new draw per round, so
           the prefix cache starts cold in each): seconds per round and the median.
  argmax   one engine (prefix caching off), the workload in alternating rounds with the sampler's
           argmax the C++ kernel and PyTorch's.

    .venv/bin/python loadtest/bench_small_kernels.py calls [--shapes 128x128 ...] [--rows 1 16 128 512]
    .venv/bin/python loadtest/bench_small_kernels.py engine [--preset micro] [--workload decode] [--thresholds 0 262144 ...] [--rounds 6]
    .venv/bin/python loadtest/bench_small_kernels.py argmax [--preset micro] [--workload decode] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import EngineConfig, LLMEngine, SamplingParams, ensure_demo_checkpoint
from engine.kernels import cpu_features
from engine.layers import packed_linear
from loadtest.workloads import WORKLOADS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ["128x128", "128x256", "344x128", "128x2048", "512x512", "512x1024", "768x2304"]


def _best_us(fn, calls: int = 100, repeats: int = 5) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def run_calls(args: argparse.Namespace) -> None:
    print("| K x N | elements | rows | F.linear (us) | packed (us) | packed / F.linear |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        weight = torch.randn(n, k)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear._DECODE_ROWS_HINT)
        for rows in args.rows:
            x = torch.randn(rows, k)
            plain = _best_us(lambda x=x, w=weight: F.linear(x, w))
            onednn = _best_us(
                lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            )
            print(f"| {k} x {n} | {k * n:,} | {rows} | {plain:.1f} | {onednn:.1f} | {onednn / plain:.2f} |")
    k, n = (int(v) for v in args.shapes[0].split("x"))
    weight = torch.randn(n, k)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear._DECODE_ROWS_HINT)
    batches = [torch.randn(rows, k) for rows in range(1, 129)]
    for label, call in (
        ("packed", lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")),
        ("F.linear", lambda x: F.linear(x, weight)),
    ):
        passes = []
        for _ in range(2):
            start = time.perf_counter()
            for x in batches:
                call(x)
            passes.append((time.perf_counter() - start) / len(batches) * 1e6)
        print(
            f"{k} x {n}, {label}, rows 1..128 each once: first pass {passes[0]:.1f} us per call, second {passes[1]:.1f}"
        )


def _checkpoint_and_workloads(args: argparse.Namespace):
    """The preset's checkpoint folder, and draw(seed) -> the workload drawn with that seed."""
    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    return folder, lambda seed: WORKLOADS[args.workload](vocab_size, seed=seed)


def _generate_seconds(engine: LLMEngine, workload) -> float:
    """Wall seconds for `engine` to answer `workload` greedily, EOS ignored."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    start = time.perf_counter()
    engine.generate(workload.prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def run_engines(args: argparse.Namespace) -> None:
    folder, draw = _checkpoint_and_workloads(args)
    engines = {}
    for threshold in args.thresholds:
        packed_linear.MIN_PACKED_FLOAT32_WEIGHT = threshold  # read at load, by pack_linear_weights
        engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32"))
        _generate_seconds(engine, draw(1))  # warm, on another draw
        engines[threshold] = engine
    seconds = {threshold: [] for threshold in args.thresholds}
    for round_index in range(args.rounds):
        workload = draw(10 + round_index)
        order = args.thresholds if round_index % 2 == 0 else args.thresholds[::-1]
        for threshold in order:
            seconds[threshold].append(_generate_seconds(engines[threshold], workload))
    print(f"{args.preset}/{args.workload}, float32, {args.rounds} alternating rounds")
    print("| MIN_PACKED_FLOAT32_WEIGHT | packed layers (LM head included) | seconds per round | median (s) |")
    print("|---:|---:|---|---:|")
    for threshold, engine in engines.items():
        packed = sum(
            1
            for m in engine.runner.model.modules()
            if getattr(m, "quant_method", None) is packed_linear.ONEDNN_PACKED
            or getattr(getattr(m, "matmul", None), "func", None) is packed_linear._packed_linear  # the head
        )
        rounds = ", ".join(f"{s:.3f}" for s in seconds[threshold])
        print(f"| {threshold:,} | {packed} | {rounds} | {statistics.median(seconds[threshold]):.3f} |")


def run_argmax(args: argparse.Namespace) -> None:
    from engine.executor import sampler

    folder, draw = _checkpoint_and_workloads(args)
    kernels = {"C++ argmax_rows": sampler.argmax, "torch.argmax": lambda x: x.argmax(dim=-1)}
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", enable_prefix_caching=False))
    _generate_seconds(engine, draw(1))  # warm, on another draw
    seconds = {name: [] for name in kernels}
    try:
        for round_index in range(args.rounds):
            workload = draw(10 + round_index)
            order = list(kernels) if round_index % 2 == 0 else list(kernels)[::-1]
            for name in order:
                sampler.argmax = kernels[name]
                seconds[name].append(_generate_seconds(engine, workload))
    finally:
        sampler.argmax = kernels["C++ argmax_rows"]
    print(f"{args.preset}/{args.workload}, float32, {args.rounds} alternating rounds, one engine")
    print("| greedy argmax | seconds per round | median (s) |")
    print("|---|---|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {', '.join(f'{s:.3f}' for s in values)} | {statistics.median(values):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["calls", "engine", "argmax"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="KxN")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 16, 128, 512])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--workload", default="decode", choices=sorted(WORKLOADS))
    parser.add_argument(
        "--thresholds",
        type=int,
        nargs="*",
        default=[0, packed_linear.MIN_PACKED_FLOAT32_WEIGHT, packed_linear.MIN_PACKED_FLOAT32_WEIGHT + 1],
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: 6 (engine), 10 (argmax)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {cpu_features.describe()}, {args.threads} threads")
    if args.rounds is None:
        args.rounds = 10 if args.what == "argmax" else 6
    {"calls": run_calls, "engine": run_engines, "argmax": run_argmax}[args.what](args)


if __name__ == "__main__":
    main()
