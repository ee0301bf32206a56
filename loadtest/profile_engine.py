"""Where an engine run's time goes: the standard workload under torch.profiler, by category.

    .venv/bin/python loadtest/profile_engine.py --dtype bfloat16 [--num-requests 64] [--ops]
    .venv/bin/python loadtest/profile_engine.py --preset micro --workload decode --dtype float32 --phases

Prints the wall time, then the self CPU time of the profiled ops summed by category (matmul,
attention, KV-cache writes and page gathers, sampling, elementwise and norms, the rest) and
the wall time no op accounts for: Python, scheduling and dispatch between ops. Op times are
summed over the profiled thread (the one that calls step()); torch's intra-op threads work
inside them. With --phases the run is not under torch.profiler: each step's phases are timed
instead (loadtest/step_phases.py), and the ops launched per step are counted in a second,
profiled run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine import EngineConfig, LLMEngine, SamplingParams, ensure_demo_checkpoint  # noqa: E402
from engine.config import DTYPES  # noqa: E402
from loadtest.bench_engine import engine_option  # noqa: E402
from loadtest.step_phases import StepPhases  # noqa: E402
from loadtest.workloads import WORKLOADS  # noqa: E402

# first match wins: op-name fragments per category
CATEGORIES = (
    ("matmul", ("mm", "linear", "matmul", "bmm", "addmm", "mkldnn", "onednn")),
    # W8A8's per-token activation maxima (engine.quant.w8a8.linear)
    ("int8 activation scales", ("linalg_vector_norm", "clamp_")),
    # the compiled graphs: the paged decode kernel (engine/kernels/paged_decode.py), its guards
    (
        "attention",
        (
            "scaled_dot_product",
            "_flash_attention",
            "attention",
            "CompiledFxGraph",
            "Torch-Compiled",
            "Dynamo",
        ),
    ),
    ("kv write / page gather", ("index_copy", "index_select")),
    ("sampling", ("argmax", "topk", "softmax", "log_softmax", "sort", "exponential", "rand")),
    (
        "elementwise and norms",
        # (rms_norm, rotary_, silu_and_mul: the fused CPU ops, engine/kernels/csrc/fused_ops.cpp)
        (
            "mul",
            "add",
            "sub",
            "div",
            "rsqrt",
            "pow",
            "mean",
            "silu",
            "cat",
            "neg",
            "to",
            "copy",
            "rms_norm",
            "rotary",
        ),
    ),
)


# ops a step repeats per layer or per group of rows (counted by --ops)
INDEX_OPS = ("aten::index", "aten::index_put_", "aten::index_select", "aten::index_copy_", "aten::_to_copy")


def category(name: str) -> str:
    short = name.removeprefix("aten::")
    for label, fragments in CATEGORIES:
        if any(f in short for f in fragments):
            return label
    return "other ops"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="standard", choices=sorted(WORKLOADS))
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--num-requests", type=int, default=None, help="default: the workload's (64; decode 128)"
    )
    parser.add_argument("--top", type=int, default=15, help="also list the N costliest ops")
    parser.add_argument("--ops", action="store_true", help="also count ops: in all, and per index op")
    parser.add_argument("--phases", action="store_true", help="time each step's phases (no profiler)")
    parser.add_argument(
        "--option",
        type=engine_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an engine option (repeatable), e.g. --option quantization=w8a8",
    )
    args = parser.parse_args(argv)
    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    sized = [args.num_requests] if args.num_requests else []
    workload = WORKLOADS[args.workload](vocab_size, *sized)
    options = {name: value for option in args.option for name, value in option.items()}
    engine = LLMEngine(EngineConfig(model=str(folder), dtype=args.dtype, **options))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    engine.generate([[1, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    # Warm (allocator, oneDNN primitives) on the same shape drawn with another seed: the same
    # prompts again would be prefix-cache hits, and the profile would skip nearly all prefill.
    warm = WORKLOADS[args.workload](vocab_size, *sized, seed=1)
    engine.generate(
        warm.prompts,
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in warm.output_lens],
        use_tqdm=False,
    )
    if args.phases:
        phases = StepPhases(engine)
        start = time.perf_counter()
        engine.generate(workload.prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        print(
            f"{args.workload} workload, {args.dtype}: {wall:.2f} s, {workload.num_output_tokens / wall:.0f} output tok/s"
        )
        print(phases.table())
        phases.close()
        workload = WORKLOADS[args.workload](vocab_size, *sized, seed=2)  # the op count's run: no cache hits
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens
        ]
    steps_before = engine.stats().steps.num_steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.generate(workload.prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        counts[event.key] += event.count
        seconds = event.self_cpu_time_total / 1e6
        totals[category(event.key)] += seconds
        by_op[event.key] += seconds
    steps = engine.stats().steps.num_steps - steps_before
    if args.phases:
        print(
            f"ops launched per step: {sum(e.count for e in prof.key_averages()) / steps:.0f} (profiled run)"
        )
        return
    print(
        f"{args.workload} workload, {args.dtype}: {wall:.2f} s wall (profiled), {workload.num_output_tokens / wall:.0f} output tok/s, {steps} steps"
    )
    print(f"| {'category':<24} | {'seconds':>8} | {'share':>6} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 8}|")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label:<24} | {seconds:8.2f} | {seconds / wall:6.1%} |")
    unaccounted = wall - sum(totals.values())
    print(f"| {'between ops (Python)':<24} | {unaccounted:8.2f} | {unaccounted / wall:6.1%} |")
    print(
        "\ncostliest ops (self CPU s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top])
    )
    if args.ops:
        print(f"\nops in all: {sum(counts.values())}; " + ", ".join(f"{k} {counts[k]}" for k in INDEX_OPS))


if __name__ == "__main__":
    main()
