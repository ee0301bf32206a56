"""`sluice submit [FILE]`: post OpenAI Batch input lines as jobs and print their result lines.

The jobs go to the jobs topic keyed by custom_id, through the same KafkaBackend as `sluice label`
and `sluice batch`; their results are read from the service's results topic (no topic of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

from schemas.codec import peek_custom_id
from service.client.backends import KafkaBackend, MissingTopicError
from service.config import ServiceConfig
from service.kafka_security import KafkaClientOptions, client_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", nargs="?", default="-", help="a JSONL batch input file; - or none: standard input"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for all results (default 120)"
    )
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the service configuration)")
    parser.add_argument("--jobs-topic", help="default: the first of the configured jobs topics")
    parser.add_argument("--results-topic", help="default: the configured results topic")


def run_submit(args: argparse.Namespace, config: ServiceConfig) -> int:
    return asyncio.run(
        submit_jobs(
            _read_lines(args.file),
            bootstrap=args.bootstrap or config.kafka_bootstrap,
            jobs_topic=args.jobs_topic or config.jobs_topics[0],
            results_topic=args.results_topic or config.results_topic,
            timeout=args.timeout,
            security=client_options(config),
        )
    )


async def submit_jobs(
    lines: list[bytes],
    bootstrap: str,
    jobs_topic: str,
    results_topic: str,
    timeout: float,
    security: KafkaClientOptions | None = None,
) -> int:
    """Post each line keyed by its custom_id, then print result lines until every id has one.

    Returns 0 when every job has its result, 1 when some have none in time or the results topic
    is missing, 2 when a line has no custom_id.
    """
    ids = [peek_custom_id(line) for line in lines]
    if None in ids:
        print(
            f"sluice: line {ids.index(None) + 1} has no custom_id; every job line needs one", file=sys.stderr
        )
        return 2
    waiting = set(ids)
    backend = KafkaBackend(bootstrap, jobs_topic, results_topic, reply_to=False, security=security)
    try:
        await backend.start()  # reads the results topic from its end as it is before any job is posted
        await backend.submit(list(zip(ids, lines, strict=True)))
        deadline = time.monotonic() + timeout
        async with contextlib.aclosing(backend.results()) as results:
            while waiting and time.monotonic() < deadline:
                for custom_id, value in await anext(results):
                    if custom_id in waiting:
                        waiting.discard(custom_id)
                        sys.stdout.write(value.decode("utf-8", "replace") + "\n")
                        sys.stdout.flush()
    except MissingTopicError:
        print(
            f"sluice: results topic {results_topic!r} does not exist; is the service running?",
            file=sys.stderr,
        )
        return 1
    finally:
        await backend.stop()
    if waiting:
        print(
            f"sluice: no result within {timeout:.0f}s for {len(waiting)} job(s): {sorted(waiting)[:5]}",
            file=sys.stderr,
        )
        return 1
    return 0


def _read_lines(path: str) -> list[bytes]:
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    return [line for line in data.splitlines() if line.strip()]
