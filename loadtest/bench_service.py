"""Service throughput and latency through Kafka, against the engine offline in the same run.

Posts the standard workload (loadtest/bench_engine.py: 64 requests, prompts 32-512, outputs
16-128, greedy, EOS ignored, `small` checkpoint) as OpenAI Batch jobs to a running local
broker, runs the service in this process on fresh topics, reads every result, and prints
output tokens/s, end-to-end latency percentiles (job record timestamp to result record
timestamp) and the ratio of service to offline throughput (target >= 0.9).

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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from engine import EngineConfig, LLMEngine  # noqa: E402
from engine.testing import ensure_checkpoint  # noqa: E402
from loadtest.bench_engine import Workload, run_sluice, standard_workload  # noqa: E402
from service.app import Service  # noqa: E402
from service.config import ServiceConfig  # noqa: E402


async def run_service_workload(
    engine: LLMEngine, workload: Workload, bootstrap: str
) -> tuple[float, int, list[float]]:
    """(seconds from first post to last result, output tokens, end-to-end latencies in seconds)."""
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
    service = Service(config, engine)
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
    finally:
        await results.stop()
        stop.set()
        await runner
        await service.stop()
    return last - start, tokens, latencies


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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each; medians are reported"
    )
    args = parser.parse_args(argv)

    folder = ensure_checkpoint(REPO_ROOT / "build" / "models", preset=args.preset)
    engine = LLMEngine(EngineConfig(model=str(folder), dtype=args.dtype))
    workload = standard_workload(engine.vocab_size, args.num_requests)
    # This machine's speed drifts by 20-30% within minutes, so: alternate which runs first, report
    # medians, and also the engine's busy share of the service run (drift cancels out of it).
    busy = _time_engine_steps(engine)
    offline_runs, service_runs = [], []
    for i in range(args.repeats):
        for mode in ("offline", "service") if i % 2 == 0 else ("service", "offline"):
            if mode == "offline":
                offline_runs.append(run_sluice(engine, workload))
                continue
            busy[0] = 0.0
            seconds, tokens, latencies = asyncio.run(run_service_workload(engine, workload, args.bootstrap))
            assert tokens == workload.num_output_tokens, (tokens, workload.num_output_tokens)
            service_runs.append((seconds, latencies, busy[0] / seconds))
    offline = sorted(offline_runs, key=lambda r: r.seconds)[len(offline_runs) // 2]  # median
    seconds, latencies, busy_share = sorted(service_runs)[len(service_runs) // 2]
    service_tps = workload.num_output_tokens / seconds
    print(
        "\nruns (offline s | service s, engine busy share):",
        [round(o.seconds, 1) for o in offline_runs],
        "|",
        [(round(s, 1), round(b, 3)) for s, _, b in service_runs],
    )
    print(f"\n{len(workload.prompts)} jobs, {workload.num_output_tokens} output tokens, {args.dtype}")
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


if __name__ == "__main__":
    main()
