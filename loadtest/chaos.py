"""Chaos soak: jobs through `python -m service` instances while they are killed, the broker dies and
the group scales; then a read_committed reader counts every custom_id.

    python -m loadtest.chaos                                  # both delivery modes, 3000 jobs, full
    python -m loadtest.chaos --delivery exactly_once --jobs 300 --scenario short --bootstrap 127.0.0.1:19092

The full scenario, by share of jobs answered: 10% kill -9 instance-1 (restarted 3 s later, as a
supervisor would), 25% kill -9 instance-2 (the same), 40% kill -9 the broker (restarted 5 s
later), 55% scale 2 -> 3 instances, 70% scale 3 -> 1 (SIGTERM: drain and leave). The short one
(`make test`) kill -9s instance-1 and restarts it once instance-2 has taken over its partitions:
instance-2's partitions are revoked and handed straight back to it, twice, with jobs in flight
(its jobs are posted at 8/s, faster than one instance answers them). The full scenario posts all jobs at the start: a backlog
of many times what the instances may hold in flight. exactly_once passes with every custom_id
read once, at_least_once with none missing. Without --bootstrap the run has a broker of its own (loadtest/chaos_cluster.py),
the only one it may kill; logs stay in build/chaos/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer

from engine import ensure_demo_checkpoint
from loadtest.chaos_cluster import REPO, ChaosBroker, Instance, ResultsReader
from loadtest.chaos_report import MODES, WARM_S, Report, Settings, handbacks
from service.topics import ensure_topics


class _Run:
    def __init__(self, settings: Settings, bootstrap: str, workdir: Path, broker: ChaosBroker | None) -> None:
        self.s, self.bootstrap, self.workdir, self.broker = settings, bootstrap, workdir, broker
        self.prefix = f"chaos-{settings.delivery.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        self.report = Report(settings)
        self.ids = [f"job-{i}" for i in range(settings.jobs)]
        self.instances: list[Instance] = []
        self.reader = ResultsReader(bootstrap, f"{self.prefix}.results", settings.partitions)
        self.t0 = time.monotonic()
        self.checkpoint: Path | None = None  # the tiny demo model the instances run
        self.t_posting = 0.0  # when posting began

    def note(self, what: str) -> None:
        self.report.events.append((time.monotonic() - self.t0, what))
        print(f"[{self.s.delivery} {time.monotonic() - self.t0:6.1f}s] {what}", flush=True)

    @property
    def answered(self) -> int:
        return len(self.reader.counts)

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
    broker = None
    if settings.bootstrap is None:
        broker = ChaosBroker(workdir / "broker", 29092)
        broker.start()
    try:
        return await _run(_Run(settings, settings.bootstrap or broker.bootstrap, workdir, broker))
    finally:
        if broker is not None:
            broker.stop()


async def _run(r: _Run) -> Report:
    s = r.s
    topics = [f"{r.prefix}.{t}" for t in ("jobs", "results", "dlq", "traces")]
    await ensure_topics(r.bootstrap, topics, s.partitions, 1)
    r.checkpoint = ensure_demo_checkpoint(REPO / "build" / "test-models", preset="tiny")
    await r.reader.start()
    sampler = asyncio.create_task(_sample_memory(r))
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
        for instance in r.instances:
            instance.kill()
        await r.reader.stop()
    return await _verdict(r)


async def _verdict(r: _Run) -> Report:
    """A fresh read_committed read of the whole results topic."""
    reader = ResultsReader(r.bootstrap, f"{r.prefix}.results", r.s.partitions)
    await reader.start()
    try:
        await reader.read_to_end()
    finally:
        await reader.stop()
    rep = r.report
    rep.seconds = time.monotonic() - r.t0
    rep.answered = len(set(r.ids) & set(reader.counts))
    rep.lost = len(r.ids) - rep.answered
    dups = {k: n for k, n in reader.counts.items() if n > 1}
    rep.duplicated, rep.extra_copies = len(dups), sum(n - 1 for n in dups.values())
    rep.examples = {k: reader.where[k] for k in list(dups)[:10]}
    rep.errors = dict(reader.errors)
    for instance in r.instances:
        for log_path in sorted(r.workdir.glob(f"{instance.name}-*.log")):
            rep.handbacks += [
                (log_path.stem, n, a) for n, a in handbacks(log_path.read_text(errors="replace"))
            ]
    return rep


async def _post(r: _Run) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=r.bootstrap, acks="all", linger_ms=20)
    await producer.start()
    r.t_posting = time.monotonic()
    try:
        sends = []
        for i, custom_id in enumerate(r.ids):
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
        "HTTP_HOST": "127.0.0.1",
        "ENGINE_MODEL": str(r.checkpoint),
        "ENGINE_MAX_MODEL_LEN": "256",
        "ENGINE_KV_CACHE_MEMORY_GIB": "0.25",
    }
    return {**os.environ, "OMP_NUM_THREADS": "1", **{f"SLUICE_{k}": v for k, v in settings.items()}}


async def _kill_and_restart(r: _Run, index: int, after_takeover: bool = False) -> None:
    """kill -9 an instance and start it again 3 s later; `after_takeover`: only once the others
    have taken over its partitions (a rebalance of their own, then a second one when it is back)."""
    instance = r.instances[index]
    await instance.wait_for_log("partitions assigned")  # it was at work
    others = [i for i in r.instances if i is not instance and i.is_running]
    seen = {i.name: i.log_text().count("partitions assigned: ") for i in others}
    instance.kill()
    await asyncio.sleep(3)
    while after_takeover and not any(_holds_all(r, i, seen[i.name]) for i in others):
        await r.reader.poll(200)
    instance.start()
    r.note(f"{instance.name} restarted")
    await instance.wait_for_log("partitions assigned", timeout=180)


def _holds_all(r: _Run, instance: Instance, assignments_before: int) -> bool:
    """A later assignment of `instance` has every partition of the jobs topic."""
    lines = [line for line in instance.log_text().splitlines() if "partitions assigned: " in line]
    return any(line.count(f"{r.prefix}.jobs[") == r.s.partitions for line in lines[assignments_before:])


async def _kill_broker(r: _Run) -> None:
    if r.broker is None:
        r.note("(no broker of its own: broker kill skipped)")
        return
    r.broker.hard_kill()
    await asyncio.sleep(5)
    await asyncio.to_thread(r.broker.start)
    r.note("broker restarted")


async def _scale_up(r: _Run) -> None:
    await r.new_instance().wait_for_log("partitions assigned", timeout=180)


async def _scale_down(r: _Run) -> None:
    await asyncio.gather(*(i.stop() for i in r.instances[1:]))


Action = Callable[[_Run], Awaitable[None]]
SCENARIOS: dict[str, list[tuple[float, str, Action]]] = {
    "full": [
        (0.10, "kill -9 instance-1, restart in 3 s", lambda r: _kill_and_restart(r, 0)),
        (0.25, "kill -9 instance-2, restart in 3 s", lambda r: _kill_and_restart(r, 1)),
        (0.40, "kill -9 the broker, restart in 5 s", _kill_broker),
        (0.55, "scale 2 -> 3 instances", _scale_up),
        (0.70, "scale 3 -> 1 instance (SIGTERM)", _scale_down),
    ],
    "short": [
        (
            0.05,
            "kill -9 instance-1, restart once instance-2 holds every partition",
            lambda r: _kill_and_restart(r, 0, after_takeover=True),
        )
    ],
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # retries while topics and the broker come up
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--delivery", choices=[*MODES, "both"], default="both")
    parser.add_argument("--jobs", type=int, help="default: 3000 (full), 250 (short)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="full")
    parser.add_argument(
        "--bootstrap", help="use this broker (it is not killed); default: a broker of its own"
    )
    parser.add_argument("--max-tokens", type=int, help="per job; default: 64 (full), 128 (short)")
    parser.add_argument("--max-in-flight", type=int, help="per instance; default: 64 (full), 16 (short)")
    parser.add_argument("--timeout", type=float, help="seconds per delivery mode")
    args = parser.parse_args(argv)
    workdir = REPO / "build" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    ok = True
    for delivery in MODES if args.delivery == "both" else (args.delivery,):
        settings = Settings.short(delivery) if args.scenario == "short" else Settings(delivery)
        settings.bootstrap = args.bootstrap
        for name in ("jobs", "max_tokens", "max_in_flight", "timeout"):
            if (value := getattr(args, name)) is not None:
                setattr(settings, "timeout_s" if name == "timeout" else name, value)
        report = asyncio.run(run(settings, workdir / delivery))
        print(report.summary(), flush=True)
        ok &= report.ok
    print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
