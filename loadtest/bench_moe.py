"""Mixture of experts on CPU: the grouped expert computation against a loop over experts, and a
small MoE model against a dense one with the same active parameters per token.

1. Layer: engine.layers.moe's FusedMoE on random weights, three ways on the same tokens and
   routing: `grouped-mm` (tokens sorted by expert, torch._grouped_mm), `matmul-per-expert`
   (the same sorted slices, one matmul per expert) and `loop` (Transformers' eager way: a mask
   per expert gathers its tokens; engine.layers.moe.looped_experts). Shapes: Mixtral-like (8
   experts, top-2) and Qwen3-MoE-like (64 experts, top-8), hidden size 512, at a decode batch
   (16 tokens) and a prompt chunk (256 tokens).
2. Model: output tokens/s of `bench-mixtral` (tiny's shapes, 8 experts of half tiny's MLP,
   top-2) against `tiny` (dense): equal active parameters, four times the MLP weights.

3. Parallel layouts (`--parallel`): one rank's share of the layer, ranks simulated in one
   process, for 2 ranks: tensor parallel (`tp`: every expert, half its intermediate dim) against
   expert parallel (`ep`: half the experts, whole), routing uniform or skewed (the first half of
   the experts' logits raised by 1, so rank 0's experts get most tokens under `ep`). A step waits
   for its slowest rank; the all-reduce after it is the same in both layouts and not timed.

Variants alternate within each round in one process, so a shared, loaded machine slows them
alike; the tables give each variant's best round (load only adds time) and, for the layer,
the median too, with the ratio of best rounds to the baseline.

    .venv/bin/python loadtest/bench_moe.py              # both parts, one thread (~6 min on a loaded machine)
    .venv/bin/python loadtest/bench_moe.py --rounds 1   # a quick check of the script
    .venv/bin/python loadtest/bench_moe.py --parallel   # part 3 only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine import EngineConfig, LLMEngine, SamplingParams, ensure_demo_checkpoint  # noqa: E402
from engine.distributed import parallel_state  # noqa: E402
from engine.layers.activation import ActAndMul  # noqa: E402
from engine.layers.moe import FusedMoE, fused_experts, looped_experts, select_experts  # noqa: E402

MODELS = REPO_ROOT / "build" / "models"
# name -> (experts, top-k, hidden, expert intermediate size)
LAYER_SHAPES = {"mixtral-like": (8, 2, 512, 896), "qwen3-moe-like": (64, 8, 512, 192)}
TOKEN_COUNTS = (16, 256)


def time_alternating(
    variants: dict[str, Callable[[], object]], rounds: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per call of each variant over the rounds; each round runs every
    variant `repeat` times, the variants taking turns, so that a burst of load from elsewhere
    hits them alike. Load only ever adds time: the best round is the steadier estimate."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: (min(values), statistics.median(values)) for name, values in samples.items()}


def _random_layer(num_experts: int, hidden: int, intermediate: int) -> FusedMoE:
    torch.manual_seed(0)
    experts = FusedMoE(num_experts, hidden, intermediate, ActAndMul("silu"))
    for param in experts.parameters():
        param.data.normal_(0.0, 0.02)
    return experts


def layer_rows(rounds: int) -> list[tuple]:
    rows = []
    for shape, (num_experts, top_k, hidden, intermediate) in LAYER_SHAPES.items():
        experts = _random_layer(num_experts, hidden, intermediate)
        for num_tokens in TOKEN_COUNTS:
            x = torch.randn(num_tokens, hidden)
            weights, ids = select_experts(torch.randn(num_tokens, num_experts), top_k, renormalize=True)
            variants = _layer_variants(experts, x, weights, ids)
            with torch.inference_mode():
                times = time_alternating(variants, rounds, repeat=max(1, 64 // num_tokens))
            for name, (best, median) in times.items():
                rows.append((shape, num_tokens, name, best * 1e3, median * 1e3, times["loop"][0] / best))
    return rows


def parallel_rows(rounds: int) -> list[tuple]:
    rows = []
    for shape, (num_experts, top_k, hidden, intermediate) in LAYER_SHAPES.items():
        whole = _random_layer(num_experts, hidden, intermediate)
        ranks = {
            (layout, r): _rank_layer(whole, r, 2, layout == "ep") for layout in ("tp", "ep") for r in (0, 1)
        }
        for routing in ("uniform", "skewed"):
            for num_tokens in TOKEN_COUNTS:
                x = torch.randn(num_tokens, hidden)
                logits = torch.randn(num_tokens, num_experts)
                if routing == "skewed":
                    logits[:, : num_experts // 2] += 1.0
                weights, ids = select_experts(logits, top_k, renormalize=True)
                variants = {
                    key: partial(fused_experts, layer, x, weights, ids) for key, layer in ranks.items()
                }
                with torch.inference_mode():
                    times = time_alternating(variants, rounds, repeat=max(1, 64 // num_tokens))
                for layout in ("tp", "ep"):
                    rank_ms = [times[(layout, r)][0] * 1e3 for r in (0, 1)]
                    rows.append((shape, routing, num_tokens, layout, *rank_ms, max(rank_ms)))
    return rows


def model_rows(rounds: int) -> list[tuple]:
    prompts = [[1] + [(i * 37 + j * 11) % 4000 + 4 for j in range(63)] for i in range(16)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    engines = {
        name: LLMEngine(EngineConfig(dtype="float32", model=str(ensure_demo_checkpoint(MODELS, preset=name))))
        for name in ("tiny", "bench-mixtral")
    }
    variants = {
        name: lambda e=engine: e.generate(prompts, params, use_tqdm=False) for name, engine in engines.items()
    }
    times = time_alternating(variants, rounds, repeat=1)
    output_tokens = len(prompts) * params.max_tokens
    rows = []
    for name, engine in engines.items():
        total = sum(p.numel() for p in engine.runner.model.parameters())
        best = times[name][0]
        rows.append((name, total / 1e6, output_tokens / best, times["tiny"][0] / best))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="layer rounds (the model part: a fifth)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared, oversubscribed machine two OpenMP threads "
        "wait on each other at every small op, which swamps what is measured)",
    )
    parser.add_argument("--skip-model", action="store_true", help="the layer table only")
    parser.add_argument("--parallel", action="store_true", help="the parallel layouts' table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.rounds} rounds")
    if args.parallel:
        print(
            "\n| shape | routing | tokens | layout | rank 0 ms | rank 1 ms | slowest rank ms |"
            "\n|---|---|---|---|---|---|---|"
        )
        for shape, routing, tokens, layout, rank_0, rank_1, slowest in parallel_rows(args.rounds):
            print(
                f"| {shape} | {routing} | {tokens} | {layout} | {rank_0:.2f} | {rank_1:.2f} | {slowest:.2f} |"
            )
        return
    print(
        "\n| shape | tokens | variant | best ms / call | median ms | best vs loop |\n|---|---|---|---|---|---|"
    )
    for shape, tokens, name, best, median, ratio in layer_rows(args.rounds):
        print(f"| {shape} | {tokens} | {name} | {best:.2f} | {median:.2f} | {ratio:.2f}x |")
    if args.skip_model:
        return
    print("\n| model | parameters (M) | output tokens/s (best round) | vs dense |\n|---|---|---|---|")
    for name, millions, tokens_per_s, ratio in model_rows(max(1, args.rounds // 5)):
        print(f"| {name} | {millions:.1f} | {tokens_per_s:.0f} | {ratio:.2f}x |")


def _layer_variants(experts: FusedMoE, x, weights, ids) -> dict[str, Callable[[], object]]:
    return {
        "loop": lambda: looped_experts(experts, x, weights, ids),
        "grouped-mm": lambda: _grouped(experts, x, weights, ids, True),
        "matmul-per-expert": lambda: _grouped(experts, x, weights, ids, False),
    }


def _rank_layer(whole: FusedMoE, rank: int, size: int, expert_parallel: bool) -> FusedMoE:
    """Rank `rank` of `size` of `whole` (tensor or expert parallel), built as a worker would build it."""
    state = parallel_state.ParallelState(rank, size, tp_size=size, expert_parallel=expert_parallel)
    previous, parallel_state._state = parallel_state._state, state
    try:
        layer = FusedMoE(
            whole.num_experts, whole.down_proj.shape[1], whole.intermediate_size, whole.activation
        )
    finally:
        parallel_state._state = previous
    for name, param in layer.named_parameters():
        layer.weight_loader(param, getattr(whole, name).data)
    return layer


def _grouped(experts: FusedMoE, x, weights, ids, use_grouped_mm: bool) -> torch.Tensor:
    experts.use_grouped_mm = use_grouped_mm
    return fused_experts(experts, x, weights, ids)


if __name__ == "__main__":
    main()
