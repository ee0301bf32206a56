"""Sluice alone on one workload, in two or more source trees (git worktrees), alternating: the
A/B for a change or a regression check on a machine too noisy for absolute numbers.

    git worktree add --detach ../base <commit>   # then link its .venv and build/models
    .venv/bin/python loadtest/bench_trees.py ../base . --dtype float32 --num-requests 16 --threads 1

Each run is a fresh process started in its tree (so `import engine` is that tree's), timing one
`generate()` of the workload after a two-token warm-up; round r runs the trees in order, round
r + 1 in reverse. Prints every run, then each tree's median. `--grammar-every N` puts every
N-th request under a regex (structured output), to time the grammar masks' cost. The workload comes from this
tree's loadtest/workloads.py; the checkpoint is this tree's build/models preset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAMMAR_REGEX = "[a-z]+( [a-z]+)*"  # words and spaces: open-ended, the length limit ends most outputs

# runs in the tree under test (cwd): its engine, this tree's workloads
_RUN = """
import importlib.util, json, sys, time
sys.path.insert(0, '.')
import engine
from engine import EngineConfig, LLMEngine, SamplingParams
spec = importlib.util.spec_from_file_location('sluice_workloads', {root!r} + '/loadtest/workloads.py')
workloads = sys.modules['sluice_workloads'] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workloads)
WORKLOADS = workloads.WORKLOADS
assert engine.__file__.startswith({tree!r}), engine.__file__
vocab = json.load(open({folder!r} + '/config.json'))['vocab_size']
w = WORKLOADS[{workload!r}](vocab, {num_requests})
eng = LLMEngine(EngineConfig(model={folder!r}, dtype={dtype!r}, max_num_batched_tokens=2048))
from engine import StructuredOutputs
grammar = StructuredOutputs(regex={regex!r})
params = [
    SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                   structured_outputs=grammar if {grammar_every} and i % {grammar_every} == 0 else None)
    for i, n in enumerate(w.output_lens)
]
eng.generate(w.prompts[:4], params[:4], use_tqdm=False)  # warm-up, grammars' tokenizer included
start = time.perf_counter()
outputs = eng.generate(w.prompts, params, use_tqdm=False)
print('SECONDS', time.perf_counter() - start, sum(len(o.token_ids) for o in outputs))
"""


def run_once(tree: Path, args: argparse.Namespace, folder: Path) -> tuple[float, int]:
    code = _RUN.format(
        root=str(REPO_ROOT),
        tree=str(tree),
        folder=str(folder),
        workload=args.workload,
        num_requests=args.num_requests,
        dtype=args.dtype,
        grammar_every=args.grammar_every,
        regex=GRAMMAR_REGEX,
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    python = tree / ".venv" / "bin" / "python"
    done = subprocess.run([str(python), "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS")]
    if done.returncode or not lines:
        sys.exit(f"run in {tree} failed:\n{done.stderr[-3000:]}")
    _, seconds, tokens = lines[-1].split()
    return float(seconds), int(tokens)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from engine.config import DTYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees, each with its .venv")
    parser.add_argument("--workload", default="standard", choices=["standard", "shared-prefix", "decode"])
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--grammar-every", type=int, default=0, help="every N-th request under a regex (0: none)"
    )
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in args.trees]
    from engine import ensure_demo_checkpoint

    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    seconds: dict[Path, list[float]] = {tree: [] for tree in trees}
    for round_index in range(args.rounds):
        for tree in trees if round_index % 2 == 0 else trees[::-1]:
            run_seconds, tokens = run_once(tree, args, folder)
            seconds[tree].append(run_seconds)
            print(
                f"round {round_index + 1}: {tree} {run_seconds:.2f} s {tokens / run_seconds:.1f} tok/s",
                flush=True,
            )
    print(
        json.dumps(
            {str(t): {"runs": s, "median": statistics.median(s)} for t, s in seconds.items()}, indent=1
        )
    )


if __name__ == "__main__":
    main()
