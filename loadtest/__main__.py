"""`python -m loadtest run`: drive a running Sluice, then write report.html and its charts.

    python -m loadtest run --rate 4 --duration 60            # open loop: Poisson arrivals, 4 jobs/s
    python -m loadtest run --concurrency 16 --duration 60    # closed loop: 16 jobs in flight

Kafka, topics, security and the model (for the offline comparison) come from the same
SLUICE_* variables the service reads; the options below override them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from service.config import ConfigError, load_config
from service.kafka_security import client_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="offer load to a running service and write a report")
    load = run.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many jobs/s")
    load.add_argument("--concurrency", type=int, help="closed loop: keep this many jobs in flight")
    run.add_argument("--duration", type=float, required=True, help="seconds of offered load")
    run.add_argument("--bootstrap", help="Kafka bootstrap servers (default: SLUICE_KAFKA_BOOTSTRAP)")
    run.add_argument("--jobs-topic", help="default: the first of SLUICE_JOBS_TOPICS")
    run.add_argument("--results-topic", help="default: SLUICE_RESULTS_TOPIC")
    run.add_argument(
        "--metrics-url", help="default: http://127.0.0.1:SLUICE_HTTP_PORT/metrics; 'none' to skip"
    )
    run.add_argument(
        "--prompt-tokens", default="32-256", help="uniform range of prompt lengths (default 32-256)"
    )
    run.add_argument(
        "--output-tokens", default="16-64", help="uniform range of output lengths (default 16-64)"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to wait for the last results"
    )
    run.add_argument("--no-offline", action="store_true", help="skip the engine-alone comparison")
    run.add_argument("--out", default="build/loadtest-report", help="folder for report.html and the PNGs")
    args = parser.parse_args(argv)
    try:
        config = load_config()
        prompt_range, output_range = _range(args.prompt_tokens), _range(args.output_tokens)
        if (args.rate is not None and args.rate <= 0) or (
            args.concurrency is not None and args.concurrency < 1
        ):
            raise ValueError("--rate must be > 0 and --concurrency >= 1")
        if args.duration <= 0:
            raise ValueError("--duration must be > 0")
    except (ConfigError, ValueError) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2

    import engine  # noqa: F401 (torch loads only once the arguments are fine)
    from loadtest.driver import JobShape, Target, run_load
    from loadtest.offline import offline_tokens_per_s
    from loadtest.report import summary, write_report
    from service.engine_loading import resolve_engine_config

    engine_config = resolve_engine_config(config)
    vocab_size = json.loads((Path(engine_config.model) / "config.json").read_text())["vocab_size"]
    metrics_url = args.metrics_url or f"http://127.0.0.1:{config.http_port}/metrics"
    target = Target(
        bootstrap=args.bootstrap or config.kafka_bootstrap,
        jobs_topic=args.jobs_topic or config.jobs_topics[0],
        results_topic=args.results_topic or config.results_topic,
        metrics_url=None if metrics_url == "none" else metrics_url,
        security=client_options(config),
    )
    shape = JobShape(vocab_size, prompt_range, output_range, args.seed)
    run_result = asyncio.run(
        run_load(target, shape, args.duration, args.rate, args.concurrency, args.drain_timeout)
    )
    if not args.no_offline:
        sent = [j for j in run_result.jobs if j.sent is not None]
        run_result.offline_tokens_per_s = offline_tokens_per_s(engine_config, sent)
    page = write_report(run_result, Path(args.out))
    for label, value in summary(run_result).items():
        print(f"{label}: {value}")
    print(f"report: {page}")
    return 0


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise ValueError(f"bad range {text!r}: use LOW-HIGH with 1 <= LOW <= HIGH")
    return lo, hi


if __name__ == "__main__":
    sys.exit(main())
