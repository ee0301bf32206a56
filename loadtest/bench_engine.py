"""Engine throughput on the standard workload, against Transformers measured in the same run.

Standard workload: 64 requests, prompt lengths 32-512 and output lengths 16-128 drawn with a
fixed seed, greedy, EOS ignored (every request produces exactly its output length), on the
`small` checkpoint (~125M parameters, built locally). Peers on the same checkpoint, dtype
and workload: Transformers generate() one request at a time, in padded static batches (best
of 8 and 16), and its continuous-batching API (generate_batch's manager) where installed.

    .venv/bin/python loadtest/bench_engine.py                  # everything (~15 min on 2 CPU cores)
    .venv/bin/python loadtest/bench_engine.py --peers static    # Sluice and the static batches only

Output tokens/s counts the tokens each request asked for: padding and the extra tokens a
static batch generates for its shorter requests are work, not output.

Shared-prefix workload (`--workload shared-prefix`): prefix caching on vs off. Every prompt
starts with the same 256-token instruction, then 32-256 tokens of its own, and asks for
4-16 output tokens (a label or a short answer), greedy, EOS ignored. Both settings run the
same workload on a fresh engine each (a cold cache), alternating on and off for `--rounds`
rounds; the table gives each setting's median, the on/off throughput ratio and the hit rate.

    .venv/bin/python loadtest/bench_engine.py --workload shared-prefix
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.demo_models import ensure_checkpoint  # noqa: E402

PEERS = ("sequential", "static", "continuous")


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass(slots=True)
class Row:
    mode: str
    seconds: float
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def standard_workload(vocab_size: int, num_requests: int = 64, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts, output_lens = [], []
    for _ in range(num_requests):
        length = rng.randint(32, 512)
        prompts.append([1] + [rng.randrange(4, vocab_size) for _ in range(length - 1)])
        output_lens.append(rng.randint(16, 128))
    return Workload(prompts, output_lens)


def shared_prefix_workload(
    vocab_size: int, num_requests: int = 64, prefix_len: int = 256, seed: int = 0
) -> Workload:
    rng = random.Random(seed)
    instruction = [1] + [rng.randrange(4, vocab_size) for _ in range(prefix_len - 1)]
    prompts, output_lens = [], []
    for _ in range(num_requests):
        own = [rng.randrange(4, vocab_size) for _ in range(rng.randint(32, 256))]
        prompts.append(instruction + own)
        output_lens.append(rng.randint(4, 16))
    return Workload(prompts, output_lens)


def run_prefix_caching(folder: Path, args: argparse.Namespace) -> None:
    """Caching on vs off on the shared-prefix workload, alternating, a fresh engine per run."""
    results: dict[bool, list[float]] = {True: [], False: []}
    hit_rates = []
    workload = None
    for round_index in range(args.rounds):
        order = (False, True) if round_index % 2 == 0 else (True, False)  # alternate who goes first
        for caching in order:
            engine = LLMEngine(
                EngineConfig(
                    model=str(folder),
                    dtype=args.dtype,
                    device=args.device,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    enable_prefix_caching=caching,
                )
            )
            workload = workload or shared_prefix_workload(engine.vocab_size, args.num_requests)
            row = run_sluice(engine, workload)
            results[caching].append(row.seconds)
            if caching:
                hit_rates.append(engine.stats().prefix_cache_hit_rate)
            print(
                f"round {round_index + 1}, caching {'on' if caching else 'off'}: {row.seconds:.2f} s",
                flush=True,
            )
            del engine
    assert workload is not None
    prompt_tokens = sum(map(len, workload.prompts))
    print(
        f"\n{len(workload.prompts)} requests, {prompt_tokens} prompt tokens (256 shared), "
        f"{workload.num_output_tokens} output tokens, {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} rounds"
    )
    print(f"| {'prefix caching':<14} | {'seconds':>8} | {'requests/s':>10} | {'prompt+output tok/s':>19} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 12}|{'-' * 21}|")
    tokens = prompt_tokens + workload.num_output_tokens
    for caching in (False, True):
        seconds = statistics.median(results[caching])
        print(
            f"| {'on' if caching else 'off':<14} | {seconds:8.2f} | {len(workload.prompts) / seconds:10.2f} | "
            f"{tokens / seconds:19.1f} |"
        )
    ratio = statistics.median(results[False]) / statistics.median(results[True])
    print(
        f"\nthroughput with caching on / off: {ratio:.2f}x; prefix-cache hit rate {statistics.median(hit_rates):.1%}"
    )


def run_sluice(engine: LLMEngine, workload: Workload) -> Row:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    engine.generate([[1, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == workload.num_output_tokens, (produced, workload.num_output_tokens)
    return Row("sluice", seconds, produced)


def run_sequential(model, workload: Workload) -> Row:
    start = time.perf_counter()
    for prompt, n in zip(workload.prompts, workload.output_lens, strict=True):
        ids = torch.tensor([prompt])
        _generate(model, ids, torch.ones_like(ids), n)
    return Row("transformers one at a time", time.perf_counter() - start, workload.num_output_tokens)


def run_static(model, workload: Workload, batch_size: int) -> Row:
    """Padded static batches in arrival order; each batch runs to its longest output."""
    start = time.perf_counter()
    for i in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[i : i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        _generate(model, ids, mask, max(workload.output_lens[i : i + batch_size]))
    return Row(
        f"transformers static batches of {batch_size}",
        time.perf_counter() - start,
        workload.num_output_tokens,
    )


def decode_roofline(engine: LLMEngine, batch: int = 64, context: int = 512, steps: int = 64) -> None:
    """Decode tokens/s against the memory-bandwidth floor: each step reads all weights and the KV cache."""
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(4, 1000) for _ in range(context - 1)] for _ in range(batch)]

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        engine.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    decode_s = timed(steps + 1) - timed(1)  # the difference is `steps` decode steps of the whole batch
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_bytes = batch * (context + steps / 2) * engine.runner.kv_bytes_per_block / engine.block_size
    bandwidth = _measure_bandwidth(engine.runner.device)
    ceiling = batch / ((weight_bytes + kv_bytes) / bandwidth)
    measured = batch * steps / decode_s
    print(
        f"\ndecode, batch {batch}, context {context}: {measured:.0f} tok/s; bandwidth floor "
        f"({weight_bytes / 1e9:.2f} GB weights + {kv_bytes / 1e9:.2f} GB KV per step at "
        f"{bandwidth / 1e9:.0f} GB/s) allows {ceiling:.0f} tok/s: {measured / ceiling:.0%} of the floor"
    )


def _measure_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * src.element_size() * 10 / (time.perf_counter() - start)


def run_continuous(model, workload: Workload) -> Row | None:
    if not hasattr(model, "init_continuous_batching"):
        return None
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max(workload.output_lens), eos_token_id=-1, pad_token_id=0
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        produced = 0
        for _ in workload.prompts:
            result = manager.get_result(timeout=600)
            produced += len(result.generated_tokens)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return Row("transformers continuous batching", seconds, produced)


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
    with torch.inference_mode():
        model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # EOS ignored, as for Sluice
            pad_token_id=0,
        )


def print_table(rows: list[Row], workload: Workload, dtype: str) -> None:
    sluice = next(r for r in rows if r.mode == "sluice")
    peers = [r for r in rows if r.mode != "sluice"]
    print(
        f"\n{len(workload.prompts)} requests, {sum(map(len, workload.prompts))} prompt tokens, "
        f"{workload.num_output_tokens} output tokens, {dtype}, {torch.get_num_threads()} threads"
    )
    print(f"| {'mode':<36} | {'seconds':>8} | {'output tok/s':>12} | {'sluice / mode':>13} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 14}|{'-' * 15}|")
    for row in rows:
        print(
            f"| {row.mode:<36} | {row.seconds:8.1f} | {row.tokens_per_s:12.1f} | "
            f"{sluice.tokens_per_s / row.tokens_per_s:12.2f}x |"
        )
    if peers:
        best = max(peers, key=lambda r: r.tokens_per_s)
        print(f"\nSluice vs the best peer ({best.mode}): {sluice.tokens_per_s / best.tokens_per_s:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="standard", choices=["standard", "shared-prefix"])
    parser.add_argument("--rounds", type=int, default=3, help="shared-prefix: on/off runs of each setting")
    parser.add_argument("--preset", default="small", help="checkpoint preset (engine.demo_models)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--static-batch-sizes", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--decode-roofline", action="store_true", help="also: decode tok/s vs the bandwidth floor"
    )
    args = parser.parse_args(argv)

    folder = ensure_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    if args.workload == "shared-prefix":
        run_prefix_caching(folder, args)
        return
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(
        EngineConfig(
            model=str(folder),
            dtype=args.dtype,
            device=args.device,
            max_num_batched_tokens=args.max_num_batched_tokens,
            gpu_memory_utilization=0.6,  # leaves room for the Transformers peer on the same GPU
        )
    )
    workload = standard_workload(engine.vocab_size, args.num_requests)
    rows = [run_sluice(engine, workload)]
    print(f"sluice: {rows[0].tokens_per_s:.1f} output tok/s", flush=True)
    if args.decode_roofline:
        decode_roofline(engine)
    del engine
    model = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    )
    if "sequential" in args.peers:
        rows.append(run_sequential(model, workload))
    if "static" in args.peers:
        static = [run_static(model, workload, b) for b in args.static_batch_sizes]
        rows.append(max(static, key=lambda r: r.tokens_per_s))
        for row in static:
            print(f"{row.mode}: {row.tokens_per_s:.1f} output tok/s", flush=True)
    if "continuous" in args.peers and (row := run_continuous(model, workload)) is not None:
        rows.append(row)
    print_table(rows, workload, args.dtype)


if __name__ == "__main__":
    main()
