"""The `sluice` command: `sluice serve` runs the service; `sluice submit` posts jobs and prints their results;
`sluice label` labels a dataset; `sluice batch` runs an OpenAI Batch file (a drop-in for `vllm run-batch`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.codec import peek_custom_id
from service.config import ConfigError, load_config
from service.kafka_security import KafkaClientOptions, client_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the service in the foreground (same as python -m service)")
    submit = commands.add_parser(
        "submit", help="post OpenAI Batch input lines as jobs and print their result lines"
    )
    submit.add_argument(
        "file", nargs="?", default="-", help="a JSONL batch input file; - or none: standard input"
    )
    submit.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for all results (default 120)"
    )
    submit.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the service configuration)")
    submit.add_argument("--jobs-topic", help="default: the first of the configured jobs topics")
    submit.add_argument("--results-topic", help="default: the configured results topic")
    from service.client import batch, label

    label.add_arguments(commands.add_parser("label", help="label a dataset (JSONL, CSV, Parquet) row by row"))
    batch.add_arguments(
        commands.add_parser("batch", help="run an OpenAI Batch input file, write its output file")
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        from service.__main__ import main as serve_main

        return serve_main()
    try:
        config = load_config()
    except ConfigError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    if args.command in ("label", "batch"):
        return _run_file(args, config)
    lines = _read_lines(args.file)
    return asyncio.run(
        submit_jobs(
            lines,
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
    """Post each line keyed by its custom_id, then print result lines until every id has one."""
    ids = [peek_custom_id(line) for line in lines]
    if None in ids:
        print(
            f"sluice: line {ids.index(None) + 1} has no custom_id; every job line needs one", file=sys.stderr
        )
        return 2
    waiting = set(ids)
    security = security or {}
    results = await _results_reader(bootstrap, results_topic, security)
    try:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **security
        )
        await producer.start()
        try:
            for line, custom_id in zip(lines, ids, strict=True):
                await producer.send(jobs_topic, value=line, key=custom_id.encode())
            await producer.flush()
        finally:
            await producer.stop()
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for records in (await results.getmany(timeout_ms=500)).values():
                for record in records:
                    key = record.key.decode() if record.key else None
                    if key in waiting:
                        waiting.discard(key)
                        sys.stdout.write(record.value.decode("utf-8", "replace") + "\n")
                        sys.stdout.flush()
    finally:
        await results.stop()
    if waiting:
        print(
            f"sluice: no result within {timeout:.0f}s for {len(waiting)} job(s): {sorted(waiting)[:5]}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _results_reader(bootstrap: str, topic: str, security: KafkaClientOptions) -> AIOKafkaConsumer:
    """A group-less reader positioned at the end of the results topic, before any job is posted."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for p in description.get("partitions", [])]
    if description.get("error_code") or not partitions:
        raise SystemExit(f"sluice: results topic {topic!r} does not exist; is the service running?")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **security)
    await consumer.start()
    assigned = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    for tp in assigned:
        await consumer.position(tp)  # resolve the end offsets now, not after the results arrive
    return consumer


def _run_file(args: argparse.Namespace, config) -> int:
    """`sluice label` / `sluice batch`: bad input or options end with a message and exit code 2."""
    from aiokafka.errors import KafkaError

    from service.client import batch, label
    from service.client.inputs import InputError
    from service.client.ledger import LedgerError
    from service.client.outputs import OutputError

    _quiet_libraries(args.local)
    run = label.run_label if args.command == "label" else batch.run_batch
    try:
        return asyncio.run(run(args, config))
    except (InputError, OutputError, LedgerError, ValueError, OSError) as e:
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sluice {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except KafkaError as e:
        print(
            f"sluice {args.command}: Kafka at {args.bootstrap or config.kafka_bootstrap}: {e!r}",
            file=sys.stderr,
        )
        return 1


def _quiet_libraries(local: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if local:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


def _read_lines(path: str) -> list[bytes]:
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()  # noqa: SIM115
    return [line for line in data.splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
