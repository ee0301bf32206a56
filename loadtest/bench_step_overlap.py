"""Async scheduling with grammars in the batch: does a step with a grammar still run ahead?

Before the grammar overlap, one request under a grammar kept every step of its batch
synchronous: step N+1's masks follow N's tokens, so N+1 was scheduled only once N was read
back. Now N+1 runs ahead with its masks late (engine.core.structured_output.LateGrammarMasks): the
host fills them while N+1's forward runs, and the sampler waits for them, not the forward.

One process, three engines on the `micro` checkpoint (a step's arithmetic is negligible: its
time is the host's work), each warmed on another draw of the workload, then the workload in
alternating rounds (a new draw per round); every `--grammar-every`-th request is under a regex:

  synchronous           async_scheduling off (the CPU's default)
  async, grammar syncs  async scheduling with the old rule: a grammar in the batch, no step ahead
  async, late masks     async scheduling as it is now

For each: seconds per round, output tok/s, the share of steps scheduled ahead, the host's time
filling a step's masks (ms per step with a grammar: on the critical path when synchronous or
when a grammar syncs the step, hidden behind the forward with late masks) and the sampler's
wait for late masks (ms per step that had them: what the overlap did not hide).
Greedy output is the same in all three (the tokens are counted and compared).

    .venv/bin/python loadtest/bench_step_overlap.py [--grammar-every 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputs, ensure_demo_checkpoint
from engine.core import step_plan, structured_output
from engine.kernels import cpu_features
from loadtest.workloads import WORKLOADS

REPO_ROOT = Path(__file__).resolve().parent.parent
REGEX = "[a-z]+( [a-z]+)*"  # words and spaces: open-ended, so the length limit ends most outputs
MODES = ("synchronous", "async, grammar syncs", "async, late masks")


class _Counters:
    def __init__(self) -> None:
        self.ahead = 0
        self.mask_waits: list[float] = []


def _engine(folder: Path, mode: str, counters: _Counters) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(model=str(folder), dtype="float32", async_scheduling=mode != "synchronous")
    )
    schedule_ahead = engine.scheduler.schedule_ahead

    def counted(running):
        if mode == "async, grammar syncs" and any(
            seq.grammar is not None and not seq.is_finished for seq in running.seqs
        ):
            return None  # the rule before the overlap
        ahead = schedule_ahead(running)
        counters.ahead += ahead is not None
        return ahead

    engine.scheduler.schedule_ahead = counted
    return engine


def _params(workload, grammar_every: int) -> list[SamplingParams]:
    grammar = StructuredOutputs(regex=REGEX)
    return [
        SamplingParams(
            temperature=0.0,
            max_tokens=n,
            ignore_eos=True,
            structured_outputs=grammar if i % grammar_every == 0 else None,
        )
        for i, n in enumerate(workload.output_lens)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--workload", default="decode", choices=sorted(WORKLOADS))
    parser.add_argument("--grammar-every", type=int, default=8, help="every N-th request is under a regex")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {cpu_features.describe()}, {torch.get_num_threads()} threads")
    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]

    def draw(seed):
        return WORKLOADS[args.workload](vocab_size, seed=seed)

    # the sampler's wait for late masks, timed where it happens (on the model thread)
    waits: list[float] = []
    wait = structured_output.LateGrammarMasks.wait

    def timed_wait(masks):
        start = time.perf_counter()
        try:
            return wait(masks)
        finally:
            waits.append(time.perf_counter() - start)

    structured_output.LateGrammarMasks.wait = timed_wait
    # the host's time filling masks, in time with the step (StepPlan.build) or late (LateGrammarMasks.fill)
    fills: list[float] = []
    grammar_masks = structured_output.grammar_masks

    def timed_grammar_masks(matchers, vocab):
        start = time.perf_counter()
        masks = grammar_masks(matchers, vocab)
        if masks is not None:
            fills.append(time.perf_counter() - start)
        return masks

    structured_output.grammar_masks = step_plan.grammar_masks = timed_grammar_masks

    counters = {mode: _Counters() for mode in MODES}
    engines = {mode: _engine(folder, mode, counters[mode]) for mode in MODES}
    warm = draw(1)
    for engine in engines.values():
        engine.generate(warm.prompts, _params(warm, args.grammar_every), use_tqdm=False)
    for c in counters.values():
        c.ahead = 0
    seconds = {mode: [] for mode in MODES}
    tokens = {mode: [] for mode in MODES}
    steps = dict.fromkeys(MODES, 0)
    late_waits = {mode: [] for mode in MODES}
    mask_fills = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        workload = draw(10 + round_index)
        params = _params(workload, args.grammar_every)
        order = MODES if round_index % 2 == 0 else MODES[::-1]
        for mode in order:
            engine = engines[mode]
            before = engine.stats().steps.num_steps
            waits.clear()
            fills.clear()
            start = time.perf_counter()
            outputs = engine.generate(workload.prompts, params, use_tqdm=False)
            seconds[mode].append(time.perf_counter() - start)
            steps[mode] += engine.stats().steps.num_steps - before
            tokens[mode].append([o.token_ids for o in outputs])
            late_waits[mode] += waits
            mask_fills[mode] += fills
    for mode in MODES[1:]:
        assert tokens[mode] == tokens[MODES[0]], f"{mode}: greedy tokens differ from the synchronous engine's"
    produced = sum(len(ids) for round_tokens in tokens[MODES[0]] for ids in round_tokens) / args.rounds
    print(
        f"{args.preset}/{args.workload}, float32, every {args.grammar_every}th request under the regex "
        f"{REGEX!r}, {args.rounds} alternating rounds, {produced:.0f} output tokens per round"
    )
    print(
        "| mode | seconds per round | median (s) | output tok/s | steps ahead "
        "| mask fill (ms/step) | late-mask wait (ms/step) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in MODES:
        median = statistics.median(seconds[mode])
        rounds = ", ".join(f"{s:.3f}" for s in seconds[mode])
        ahead = f"{counters[mode].ahead / max(steps[mode], 1):.0%}"
        fill_ms = f"{statistics.mean(mask_fills[mode]) * 1e3:.3f}"
        wait_ms = f"{statistics.mean(late_waits[mode]) * 1e3:.3f}" if late_waits[mode] else "-"
        print(
            f"| {mode} | {rounds} | {median:.3f} | {produced / median:,.0f} | {ahead} | {fill_ms} | {wait_ms} |"
        )
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
