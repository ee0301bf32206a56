"""Chaos soak: jobs and hostile records through `python -m service` instances while brokers and
instances are killed, an instance is frozen past its session timeout, and the group scales; then a
read_committed reader counts every custom_id and every hostile record's dead letter.

    python -m loadtest.chaos                                  # both delivery modes, 3000 jobs, full, 3 brokers
    python -m loadtest.chaos --delivery exactly_once --jobs 300 --scenario short --bootstrap 127.0.0.1:19092

The full scenario (loadtest/chaos_scenarios.py) runs on a KRaft cluster of its own
(loadtest/chaos_brokers.py: three nodes, replication factor 3, min.insync.replicas=2), posts
every job at the start (a backlog of many times what the instances hold in flight) with the
hostile records (loadtest/chaos_hostile.py) spread among them, and kills the leaders of the
jobs topic, __transaction_state and __consumer_offsets, kill -9s an instance, SIGSTOPs another
past its session timeout and resumes it, and scales 2 -> 3 -> 1. The short one (`make test`)
kill -9s instance-1 and restarts it once instance-2 has taken over its partitions: instance-2's
partitions are revoked and handed straight back to it, twice, with jobs in flight (its jobs are
posted at 8/s, faster than one instance answers them). It passes with no job lost, none answered
twice under exactly_once, no job answered with an error, every hostile record dead-lettered,
and no committed offset of the group ever moving back. Without --bootstrap the run has brokers
of its own (--brokers), the only ones it may kill; logs stay in build/chaos/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from engine import ensure_demo_checkpoint
from loadtest.chaos_brokers import BrokerCluster
from loadtest.chaos_cluster import REPO, Instance, ResultsReader
from loadtest.chaos_hostile import MAX_JOB_BYTES, DeadLetterReader, hostile_records, post_hostile
from loadtest.chaos_report import MODES, WARM_S, Report, Settings, handbacks
from loadtest.chaos_scenarios import SCENARIOS, zombie_evidence
from service.topics import ensure_topics


class _Run:
    def __init__(
        self, settings: Settings, bootstrap: str, workdir: Path, brokers: BrokerCluster | None
    ) -> None:
        self.s, self.bootstrap, self.workdir, self.brokers = settings, bootstrap, workdir, brokers
        self.prefix = f"chaos-{settings.delivery.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        self.report = Report(settings)
        self.ids = [f"job-{i}" for i in range(settings.jobs)]
        self.id_set = set(self.ids)
        self.instances: list[Instance] = []
        self.reader = ResultsReader(bootstrap, f"{self.prefix}.results", settings.partitions)
        self.t0 = time.monotonic()
        self.checkpoint: Path | None = None  # the tiny demo model the instances run
        self.t_posting = 0.0  # when posting began
        self.topics = [f"{self.prefix}.{t}" for t in ("jobs", "results", "dlq", "traces")]
        self.hostile: dict[tuple[int, int], str] = {}  # (partition, offset) -> what the hostile record is
        self.zombie_log_at: tuple[Instance, int] | None = None  # the resumed instance, its log's length then
        self.committed: dict[int, int] = {}  # partition -> highest committed offset seen

    def note(self, what: str) -> None:
        self.report.events.append((time.monotonic() - self.t0, what))
        print(f"[{self.s.delivery} {time.monotonic() - self.t0:6.1f}s] {what}", flush=True)

    @property
    def answered(self) -> int:
        """Ordinary jobs answered (the hostile records' error results are not jobs)."""
        return sum(1 for key in self.reader.counts if key in self.id_set)

    def new_instance(self) -> Instance:
        env = _instance_env(self, f"instance-{len(self.instances) + 1}")
        instance = Instance(env["SLUICE_CLIENT_ID"], env, self.workdir)
        self.instances.append(instance)
        instance.start()
        return instance

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            await self.reader.poll(200)
        return True


async def run(settings: Settings, workdir: Path) -> Report:
    """One delivery mode through its scenario; `workdir` keeps the instances' logs."""
    workdir.mkdir(parents=True, exist_ok=True)
    brokers = None
    if settings.bootstrap is None:
        brokers = BrokerCluster(workdir / "brokers", settings.broker_port, settings.brokers)
        await asyncio.to_thread(brokers.start)
    try:
        return await _run(_Run(settings, settings.bootstrap or brokers.bootstrap, workdir, brokers))
    finally:
        if brokers is not None:
            await asyncio.to_thread(brokers.stop)


async def _run(r: _Run) -> Report:
    s = r.s
    replication = r.brokers.replication if r.brokers else 1
    min_isr = r.brokers.min_insync_replicas if r.brokers else 1
    await ensure_topics(
        r.bootstrap, r.topics, s.partitions, replication, configs={"min.insync.replicas": str(min_isr)}
    )
    r.checkpoint = ensure_demo_checkpoint(REPO / "build" / "test-models", preset="tiny")
    await r.reader.start()
    sampler = asyncio.create_task(_sample_memory(r))
    watcher = asyncio.create_task(_watch_commits(r))
    try:
        await asyncio.gather(*(r.new_instance().wait_for_log("partitions assigned") for _ in range(2)))
        posting = asyncio.create_task(_post(r))
        if s.post_rate is None:
            await posting
            backlog = s.jobs / (2 * s.max_in_flight)
            r.note(f"2 instances consuming; posted {s.jobs} jobs ({backlog:.0f}x what they hold in flight)")
        else:
            r.note(f"2 instances consuming; posting {s.jobs} jobs at {s.post_rate:g}/s")
        for at, what, action in SCENARIOS[s.scenario]:
            if not await r.until(lambda at=at: r.answered >= at * s.jobs, s.timeout_s):
                r.note(f"timed out before: {what}")
                break
            r.note(what)
            await action(r)
        await posting
        done = await r.until(lambda: r.answered >= s.jobs, s.timeout_s - (time.monotonic() - r.t0))
        r.note("every job answered" if done else f"timed out with {r.answered} of {s.jobs} answered")
        await asyncio.gather(*(i.stop() for i in r.instances))
        r.note("instances stopped (SIGTERM)")
    finally:
        sampler.cancel()
        watcher.cancel()
        for instance in r.instances:
            instance.kill()
        await r.reader.stop()
    return await _verdict(r)


async def _verdict(r: _Run) -> Report:
    """A fresh read_committed read of the whole results topic."""
    reader = await _read_all(ResultsReader(r.bootstrap, f"{r.prefix}.results", r.s.partitions))
    rep = r.report
    rep.seconds = time.monotonic() - r.t0
    rep.answered = len(r.id_set & set(reader.counts))
    rep.lost = len(r.ids) - rep.answered
    dups = {k: n for k, n in reader.counts.items() if n > 1 and k in r.id_set}
    rep.duplicated, rep.extra_copies = len(dups), sum(n - 1 for n in dups.values())
    rep.examples = {k: reader.where[k] for k in list(dups)[:10]}
    rep.errors = dict(Counter(code for key, code in reader.error_codes.items() if key in r.id_set))
    rep.hostile_error_results = sum(n for key, n in reader.counts.items() if key not in r.id_set)
    await _count_dead_letters(r)
    if r.zombie_log_at is not None:
        rep.zombie = zombie_evidence(*r.zombie_log_at)
    for instance in r.instances:
        for log_path in sorted(r.workdir.glob(f"{instance.name}-*.log")):
            rep.handbacks += [
                (log_path.stem, n, a) for n, a in handbacks(log_path.read_text(errors="replace"))
            ]
    return rep


async def _read_all(reader):
    """The reader, once it has read its topic to the end."""
    await reader.start()
    try:
        await reader.read_to_end()
    finally:
        await reader.stop()
    return reader


async def _post(r: _Run) -> None:
    # idempotent: a send retried after a lost acknowledgement (a broker killed, a slow one) must
    # not post a job twice, or its two results would read as a duplicate of ours
    producer = AIOKafkaProducer(
        bootstrap_servers=r.bootstrap, acks="all", linger_ms=20, enable_idempotence=True
    )
    await producer.start()
    r.t_posting = time.monotonic()
    hostile = hostile_records(f"{r.prefix}.jobs") if r.s.hostile else []
    every = max(1, len(r.ids) // (len(hostile) + 1))  # one hostile record after this many jobs
    try:
        sends = []
        for i, custom_id in enumerate(r.ids):
            if i % every == every - 1 and hostile:
                await _post_hostile(r, i // every, *hostile.pop(0))
            if r.s.post_rate is not None:
                await asyncio.sleep(max(0.0, r.t_posting + i / r.s.post_rate - time.monotonic()))
            body = {"prompt": f"Job {i}: the river", "max_tokens": r.s.max_tokens, "ignore_eos": True}
            line = {"custom_id": custom_id, "url": "/v1/completions", "body": {**body, "temperature": 0}}
            sends.append(
                await producer.send(f"{r.prefix}.jobs", json.dumps(line).encode(), custom_id.encode())
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _post_hostile(r: _Run, n: int, what: str, record, codec: int) -> None:
    partition = n % r.s.partitions
    offset = await post_hostile(r.bootstrap, f"{r.prefix}.jobs", partition, record, codec)
    r.hostile[(partition, offset)] = what


async def _count_dead_letters(r: _Run) -> None:
    """Which hostile records a read_committed reader of the dead-letter topic finds answered."""
    reader = await _read_all(DeadLetterReader(r.bootstrap, f"{r.prefix}.dlq", r.s.partitions))
    rep = r.report
    rep.hostile_posted = len(r.hostile)
    answered = [source for source in r.hostile if reader.sources[source]]
    rep.hostile_answered = len(answered)
    rep.hostile_repeated = sum(1 for source in answered if reader.sources[source] > 1)
    rep.hostile_codes = {what: reader.codes.get(source, "UNANSWERED") for source, what in r.hostile.items()}
    rep.other_dead_letters = sum(n for source, n in reader.sources.items() if source not in r.hostile)


async def _watch_commits(r: _Run) -> None:
    """The group's committed offsets, every second: one that moves back was committed by a
    zombie (or redone from the wrong place). Broker errors only mean: not now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=r.bootstrap)
    await admin.start()
    try:
        while True:
            await asyncio.sleep(1)
            try:
                offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(f"{r.prefix}-group"), 5)
            except (TimeoutError, KafkaError):
                continue
            for tp, committed in offsets.items():
                highest = r.committed.get(tp.partition, -1)
                if 0 <= committed.offset < highest:
                    r.report.commits_back.append(
                        (time.monotonic() - r.t0, tp.partition, highest, committed.offset)
                    )
                r.committed[tp.partition] = max(highest, committed.offset)
    finally:
        await admin.close()


async def _sample_memory(r: _Run) -> None:
    """Every 2 s each instance's RSS; a process counts as warm (model loaded) WARM_S after its start."""
    warm = r.report.memory_warm
    while True:
        rss = {i.name: mb for i in r.instances if (mb := i.rss_mb()) is not None}
        r.report.memory.append((time.monotonic() - r.t0, r.answered, rss))
        for i in r.instances:
            if i.name in rss and time.monotonic() - i.started_at >= WARM_S:
                key, mb = f"{i.name} (start {i.starts})", rss[i.name]
                low, high = warm.get(key, (mb, mb))
                warm[key] = (min(low, mb), max(high, mb))
        await asyncio.sleep(2)


def _instance_env(r: _Run, name: str) -> dict[str, str]:
    import os

    s = r.s
    settings = {
        "KAFKA_BOOTSTRAP": r.bootstrap,
        "JOBS_TOPICS": f"{r.prefix}.jobs",
        "RESULTS_TOPIC": f"{r.prefix}.results",
        "DLQ_TOPIC": f"{r.prefix}.dlq",
        "TRACES_TOPIC": f"{r.prefix}.traces",
        "TRACES_ENABLED": "false",
        "GROUP_ID": f"{r.prefix}-group",
        "CLIENT_ID": name,
        "DELIVERY": s.delivery,
        "TOPIC_PARTITIONS": str(s.partitions),
        "COMMIT_INTERVAL_MS": str(s.commit_interval_ms),
        "MAX_IN_FLIGHT": str(s.max_in_flight),
        "MAX_JOB_BYTES": str(MAX_JOB_BYTES),
        "TOPIC_REPLICATION": str(r.brokers.replication if r.brokers else 1),
        "HTTP_HOST": "127.0.0.1",
        "ENGINE_MODEL": str(r.checkpoint),
        "ENGINE_MAX_MODEL_LEN": "256",
        "ENGINE_KV_CACHE_MEMORY_GIB": "0.25",
    }
    return {**os.environ, "OMP_NUM_THREADS": "1", **{f"SLUICE_{k}": v for k, v in settings.items()}}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # retries while topics and the broker come up
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--delivery", choices=[*MODES, "both"], default="both")
    parser.add_argument("--jobs", type=int, help="default: 3000 (full), 250 (short)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="full")
    parser.add_argument(
        "--bootstrap", help="use this cluster (it is not killed); default: brokers of its own"
    )
    parser.add_argument("--brokers", type=int, help="KRaft nodes of its own; default: 3 (full), 1 (short)")
    parser.add_argument("--max-tokens", type=int, help="per job; default: 64 (full), 128 (short)")
    parser.add_argument("--max-in-flight", type=int, help="per instance; default: 64 (full), 16 (short)")
    parser.add_argument("--timeout", type=float, help="seconds per delivery mode")
    args = parser.parse_args(argv)
    workdir = REPO / "build" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    ok = True
    for delivery in MODES if args.delivery == "both" else (args.delivery,):
        settings = Settings.short(delivery) if args.scenario == "short" else Settings(delivery)
        settings.bootstrap = args.bootstrap
        for name in ("jobs", "brokers", "max_tokens", "max_in_flight", "timeout"):
            if (value := getattr(args, name)) is not None:
                setattr(settings, "timeout_s" if name == "timeout" else name, value)
        report = asyncio.run(run(settings, workdir / delivery))
        print(report.summary(), flush=True)
        ok &= report.ok
    print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
