"""Service throughput and latency through Kafka, against the engine offline in the same run.

Posts the standard workload (loadtest/bench_engine.py: 64 requests, prompts 32-512, outputs
16-128, greedy, EOS ignored, `small` checkpoint) as OpenAI Batch jobs to a running local
broker, runs the service in this process on fresh topics, reads every result, and prints
output tokens/s, end-to-end latency percentiles (job record timestamp to result record
timestamp) and the ratio of service to offline throughput (target >= 0.9). Every run posts the
same prompts, so after a first unmeasured run both modes find them in the prefix cache and the
runs are mostly decode; `--no-prefix-caching` makes every run compute every prompt.

    make kafka-up
    .venv/bin/python loadtest/bench_service.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from engine import EngineConfig, EngineThread, LLMEngine, ensure_demo_checkpoint  # noqa: E402
from engine.config import DTYPES  # noqa: E402
from loadtest.bench_engine import run_sluice  # noqa: E402
from loadtest.workloads import Workload, standard_workload  # noqa: E402
from service.app import Service  # noqa: E402
from service.config import ServiceConfig  # noqa: E402


@dataclass
class ServiceRun:
    seconds: float  # first job's timestamp to last result's timestamp
    tokens: int
    latencies: list[float]  # job timestamp to result timestamp, seconds
    cpu_idle: float  # share of the machine's CPU time left idle while the jobs ran


async def run_service_workload(
    engine: LLMEngine, workload: Workload, bootstrap: str, engine_thread: EngineThread | None = None
) -> ServiceRun:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = ServiceConfig(
        kafka_bootstrap=bootstrap,
        jobs_topics=[f"{prefix}.jobs"],
        results_topic=f"{prefix}.results",
        dlq_topic=f"{prefix}.dlq",
        traces_topic=f"{prefix}.traces",
        group_id=f"{prefix}-group",
        model_name="small",
        http_port=0,
    )
    service = Service(config, engine, engine_thread)
    await service.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop))
    results = AIOKafkaConsumer(
        config.results_topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await results.start()
    # Measure a running service, not its start-up: wait until it owns its partitions (the join takes seconds).
    while not service.consumer.assignment:
        await asyncio.sleep(0.05)
    try:
        idle = CpuIdle()
        job_times = await _post(workload, config.jobs_topics[0], bootstrap)
        start = min(job_times.values()) / 1000
        latencies, tokens, last = [], 0, start
        while len(latencies) < len(workload.prompts):
            for batch in (await results.getmany(timeout_ms=1000)).values():
                for record in batch:
                    body = json.loads(record.value)["response"]["body"]
                    tokens += body["usage"]["completion_tokens"]
                    latencies.append((record.timestamp - job_times[record.key.decode()]) / 1000)
                    last = max(last, record.timestamp / 1000)
        cpu_idle = idle.share()
    finally:
        await results.stop()
        stop.set()
        await runner
        await service.stop()
    return ServiceRun(last - start, tokens, latencies, cpu_idle)


async def _post(workload: Workload, topic: str, bootstrap: str) -> dict[str, int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = {}
        for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
            job = {
                "custom_id": f"job-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": "small",
                    "prompt": prompt,
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
            futures[job["custom_id"]] = await producer.send(
                topic, json.dumps(job).encode(), key=job["custom_id"].encode()
            )
        return {custom_id: (await future).timestamp for custom_id, future in futures.items()}
    finally:
        await producer.stop()


class CpuIdle:
    """The machine's idle share of CPU time since creation (/proc/stat; nan where there is none)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None

    def share(self) -> float:
        end = self._read()
        if self._start is None or end is None:
            return float("nan")
        delta = [b - a for a, b in zip(self._start, end, strict=True)]
        return delta[3] / max(1, sum(delta))  # fields: user nice system idle iowait ...


def _time_engine_steps(engine: LLMEngine) -> list[float]:
    """Wraps engine.step to add up its seconds into the returned one-element list."""
    total = [0.0]
    step = engine.step

    def timed_step():
        start = time.perf_counter()
        try:
            return step()
        finally:
            total[0] += time.perf_counter() - start

    engine.step = timed_step
    return total


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each; medians are reported"
    )
    parser.add_argument(
        "--layout",
        default="one-thread",
        choices=["one-thread", "split"],
        help="one-thread (as `sluice serve`): one EngineThread loads the engine, runs the offline peer "
        "and steps the service; split: load and offline on the main thread, the service steps on a "
        "thread of its own (the layout before EngineThread, kept to measure what it cost)",
    )
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="every run computes every prompt (by default repeated runs hit the prefix cache)",
    )
    args = parser.parse_args(argv)

    folder = ensure_demo_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    # As `sluice serve` does: one thread loads the engine, steps it in the service and (here) runs
    # the offline peer too, so both modes use the same OpenMP pool (engine/engine_thread.py).
    config = EngineConfig(
        model=str(folder), dtype=args.dtype, enable_prefix_caching=not args.no_prefix_caching
    )
    if args.layout == "split":
        engine_thread = None  # the service's AsyncLLMEngine makes a thread of its own
        engine = LLMEngine(config)
        run_offline = run_sluice
    else:
        engine_thread = EngineThread()
        engine = engine_thread.call(LLMEngine, config)
        run_offline = partial(engine_thread.call, run_sluice)
    workload = standard_workload(engine.vocab_size, args.num_requests)
    # This machine's speed drifts by 20-30% within minutes, so: alternate which runs first, report
    # medians, and also the engine's busy share of the service run (drift cancels out of it).
    busy = _time_engine_steps(engine)
    # Not measured: the first run computes every prompt; later runs, offline and service alike, find
    # the prompts' full blocks in the prefix cache (unless --no-prefix-caching) and mostly decode.
    run_offline(engine, workload)
    offline_runs, service_runs = [], []
    for i in range(args.repeats):
        for mode in ("offline", "service") if i % 2 == 0 else ("service", "offline"):
            if mode == "offline":
                idle = CpuIdle()
                offline_runs.append((run_offline(engine, workload), idle.share()))
                continue
            busy[0] = 0.0
            run = asyncio.run(run_service_workload(engine, workload, args.bootstrap, engine_thread))
            assert run.tokens == workload.num_output_tokens, (run.tokens, workload.num_output_tokens)
            service_runs.append((run, busy[0] / run.seconds))
    offline, offline_idle = sorted(offline_runs, key=lambda r: r[0].seconds)[len(offline_runs) // 2]  # median
    median_run, busy_share = sorted(service_runs, key=lambda r: r[0].seconds)[len(service_runs) // 2]
    seconds, latencies = median_run.seconds, median_run.latencies
    service_tps = workload.num_output_tokens / seconds
    print(
        "\nruns, offline (s, idle CPU share):",
        [(round(o.seconds, 1), round(idle, 2)) for o, idle in offline_runs],
        "\nruns, service (s, idle CPU share, engine busy share):",
        [(round(r.seconds, 1), round(r.cpu_idle, 2), round(b, 3)) for r, b in service_runs],
    )
    print(
        f"\n{len(workload.prompts)} jobs, {workload.num_output_tokens} output tokens, {args.dtype}, layout {args.layout}"
    )
    print(f"| {'mode':<34} | {'seconds':>8} | {'output tok/s':>12} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 14}|")
    print(
        f"| {'engine offline (generate), median':<34} | {offline.seconds:8.1f} | {offline.tokens_per_s:12.1f} |"
    )
    print(f"| {'service through Kafka, median':<34} | {seconds:8.1f} | {service_tps:12.1f} |")
    p50, p95, p99 = (_percentile(latencies, q) for q in (50, 95, 99))
    print(
        f"\nend-to-end latency (job timestamp to result timestamp): p50 {p50:.2f} s, p95 {p95:.2f} s, p99 {p99:.2f} s"
    )
    print(f"service / offline throughput: {service_tps / offline.tokens_per_s:.2f} (target >= 0.9)")
    print(f"engine busy share of the service run (median run): {busy_share:.3f}")
    print(
        f"idle CPU share (median runs): offline {offline_idle:.2f}, service {median_run.cpu_idle:.2f}"
        " (a second OpenMP pool shows here: engine/engine_thread.py)"
    )


if __name__ == "__main__":
    main()
