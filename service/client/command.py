"""What `sluice label` and `sluice batch` share: options, the backend, the resume logic, the summary."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.batch import BatchResponseLine
from service.client.backends import KafkaBackend, LocalBackend
from service.client.driver import RunDriver, RunStats, WorkItem
from service.client.inputs import check_unique_keys
from service.client.ledger import RunLedger
from service.client.progress import RunProgress, summary
from service.client.reply_topics import REPLY_RETENTION_MS, sweep_abandoned
from service.config import ServiceConfig
from service.kafka_security import client_options

log = logging.getLogger("sluice")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every run takes: where jobs go, resuming, progress."""
    parser.add_argument(
        "--local",
        action="store_true",
        help="run the engine in this process (the model from SLUICE_ENGINE_MODEL, else the demo model); no Kafka",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="with --local: serve the PEFT LoRA adapter in PATH as model NAME (repeatable); "
        "a job whose `model` is NAME runs with it",
    )
    parser.add_argument(
        "--run-id",
        help="names the run (its jobs' custom_ids and reply topic); default: the one in OUTPUT.run, else new",
    )
    parser.add_argument("--retry-errors", action="store_true", help="run the rows that failed before again")
    parser.add_argument(
        "--repost-pending",
        action="store_true",
        help="post again the jobs an earlier invocation posted that have no answer yet (default: wait for them)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        help="give up when no result came for this many seconds (default 600); rerun to resume",
    )
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the service configuration)")
    parser.add_argument("--jobs-topic", help="default: the first of the configured jobs topics")
    parser.add_argument(
        "--reply-topic",
        help="the run's own results topic (default: <results_topic>.<run id>); "
        "deleted when the run is complete if the run created it",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the summary still prints)"
    )


@dataclass(slots=True)
class RunFiles:
    """What makes one command a `sluice label` or a `sluice batch` run."""

    kind: str  # "label" | "batch": the ledger's kind and the run id's prefix
    output: Any  # LabelOutput | BatchOutput
    ledger_path: Path
    items: Callable[[], Iterable[WorkItem]]  # reads the input afresh at each call
    result_record: Callable[[str, Any, BatchResponseLine], Any]  # (key, row_id, result) -> output record
    failure_record: Callable[
        [str, Any, str, str, str | None], Any
    ]  # (key, row_id, code, message, param) -> record
    labels: Callable[[], Counter[str] | None]  # the label distribution for the summary, if any


async def execute_run(run: RunFiles, args: argparse.Namespace, config: ServiceConfig) -> int:
    """Resume or start the run, post what is not done, write the answers, print the summary.

    Returns 0 when every row has its line (failed rows included), 1 when rows are left unanswered.
    """
    keys: set[str] = set()
    total = check_unique_keys(_collect(keys, run.items()))  # InputError names a duplicate id
    retried = run.output.drop_failed() if args.retry_errors else set()
    done = len(run.output.done & keys)
    if retried or done:
        print(
            f"sluice {run.kind}: resuming: {done} of {total} rows done, {len(retried)} failed rows to retry",
            file=sys.stderr,
        )
    if done == total:  # nothing to post or wait for
        run.output.close()
        await _remove_leftovers(run, args, config)
        print(_summary(run, args, total, keys, RunStats()), file=sys.stderr)
        return 0
    if args.local:
        ledger, waiting = RunLedger.in_memory(run.kind), set()
    else:
        ledger = RunLedger.open(run.ledger_path, run.kind, args.run_id)
        posted = {key for key, n in ledger.attempts.items() if n and key in keys}
        # acknowledged jobs of an earlier invocation: their answers come; a retried row is posted again
        waiting = set() if args.repost_pending else posted - run.output.done - retried
    stats = await _drive(run, args, config, ledger, waiting, total, done)
    print(_summary(run, args, total, keys, stats), file=sys.stderr)
    return 0 if stats.is_complete else 1


async def _drive(
    run: RunFiles,
    args: argparse.Namespace,
    config: ServiceConfig,
    ledger: RunLedger,
    waiting: set[str],
    total: int,
    done: int,
) -> RunStats:
    backend = await _make_backend(args, config, ledger)
    try:
        if isinstance(backend, KafkaBackend):
            await _sweep(backend, config)
        await backend.start()
    except BaseException:
        await backend.stop()
        raise
    if isinstance(backend, KafkaBackend):
        ledger.record_created_topics(backend.created_topics)
    output = run.output
    progress = RunProgress(total, done, len(output.errors), enabled=not args.no_progress)
    driver = RunDriver(
        output, ledger, backend, run.result_record, run.failure_record, progress, args.idle_timeout
    )
    driver.expect_waiting(run.items(), waiting)
    stats = None
    try:
        stats = await driver.run(run.items(), waiting)
    finally:
        progress.close()
        output.close()
        ledger.close()
        await backend.stop()
        if isinstance(backend, KafkaBackend):  # also after Ctrl-C: the topic must not outlive its use
            await end_reply_topic(backend, ledger, output.done, stats is not None and stats.is_complete)
    if stats.is_complete:  # the output alone records the run now
        ledger.remove()
    return stats


async def end_reply_topic(
    backend: KafkaBackend, ledger: RunLedger, done: set[str], is_complete: bool
) -> None:
    """Delete the reply topic the run created once no answer can come for it: the run is complete,
    or it stopped early with no posted job unanswered. Otherwise say that it stays, and until when."""
    unanswered = {key for key, n in ledger.attempts.items() if n} - done
    if is_complete or not unanswered:
        await backend.delete_topics(ledger.created_topics)
    elif ledger.created_topics:
        days = REPLY_RETENTION_MS / 86_400_000
        print(
            f"sluice: the reply topic {backend.results_topic} stays for the {len(unanswered)} unanswered "
            f"jobs: rerun the same command to collect them; uncollected, their answers expire after "
            f"{days:g} days and a later run deletes the topic",
            file=sys.stderr,
        )


async def _sweep(backend: KafkaBackend, config: ServiceConfig) -> None:
    swept = await sweep_abandoned(backend.bootstrap, config.results_topic, backend.security)
    if swept:
        print(f"sluice: deleted {len(swept)} abandoned reply topics: {', '.join(swept)}", file=sys.stderr)


async def _remove_leftovers(run: RunFiles, args: argparse.Namespace, config: ServiceConfig) -> None:
    """A run killed between its last line and its clean-up left its ledger (and reply topic) behind."""
    if not args.local and run.ledger_path.exists():
        ledger = RunLedger.open(run.ledger_path, run.kind, args.run_id)
        await (await _make_backend(args, config, ledger)).delete_topics(ledger.created_topics)
        ledger.remove()


def _summary(run: RunFiles, args: argparse.Namespace, total: int, keys: set[str], stats: RunStats) -> str:
    return summary(
        total,
        len(run.output.done & keys),
        run.labels(),
        run.output.errors,
        stats.written,
        stats.output_tokens,
        stats.seconds,
        stats.pending,
        args.idle_timeout,
    )


def _collect(keys: set[str], items: Iterable[WorkItem]) -> Iterable[str]:
    for item in items:
        keys.add(item.key)
        yield item.key


async def _make_backend(args: argparse.Namespace, config: ServiceConfig, ledger: RunLedger):
    if args.local:
        from service.engine_loading import load_engine

        engine, engine_thread = await load_engine(
            config, announce=lambda what: print(f"sluice: {what} in this process", file=sys.stderr)
        )
        backend = LocalBackend(engine, config, engine_thread)
    else:
        backend = KafkaBackend(
            args.bootstrap or config.kafka_bootstrap,
            args.jobs_topic or config.jobs_topics[0],
            args.reply_topic or f"{config.results_topic}.{ledger.run_id}",
            reply_to=True,
            replication=config.topic_replication,
            security=client_options(config),
        )
    return backend
