"""What a chaos run breaks, and when: each step waits for a share of the jobs to be answered.

The full scenario, on three brokers: kill -9 the leader of the jobs topic's partition 0, then
of the __transaction_state partition that holds partition 0's transactional id, then of the
__consumer_offsets partition that holds the group (each restarted 5 s later, the next kill only
once every replica is back in sync); kill -9 instance-1 (restarted 3 s later); SIGSTOP
instance-2 until the group has given its partitions away, then SIGCONT (a zombie whose
commits must fail); scale 2 -> 3, then 3 -> 1 (SIGTERM: drain and leave). On one broker each
leader kill is a kill of that broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiokafka.client import CoordinationType

if TYPE_CHECKING:
    from loadtest.chaos import _Run
    from loadtest.chaos_cluster import Instance

BROKER_DOWN_S = 5.0
INSTANCE_DOWN_S = 3.0
SESSION_TIMEOUT_S = 10.0  # aiokafka's default, which the service keeps
ZOMBIE_EVIDENCE = (
    "fenced",
    "commit of",
    "transaction failed",
    "partitions revoked",
    "aborting",
    "dropped",
    "partitions assigned",
)


async def kill_and_restart(r: _Run, index: int, after_takeover: bool = False) -> None:
    """kill -9 an instance and start it again 3 s later; `after_takeover`: only once the others
    have taken over its partitions (a rebalance of their own, then a second one when it is back)."""
    instance = r.instances[index]
    await instance.wait_for_log("partitions assigned")  # it was at work
    others = [i for i in r.instances if i is not instance and i.is_running]
    seen = {i.name: _assignments(i) for i in others}
    instance.kill()
    await asyncio.sleep(INSTANCE_DOWN_S)
    while after_takeover and not any(_holds_all(r, i, seen[i.name]) for i in others):
        await r.reader.poll(200)
    instance.start()
    r.note(f"{instance.name} restarted")
    await instance.wait_for_log("partitions assigned", timeout=180)


async def zombie(r: _Run, index: int) -> None:
    """SIGSTOP an instance with jobs in flight until the group has handed all its partitions to
    the others (past its session timeout), then SIGCONT: it wakes up believing it still owns
    them. Its log from then on is kept for the report: its commits must fail."""
    instance = r.instances[index]
    others = [i for i in r.instances if i is not instance and i.is_running]
    seen = {i.name: _assignments(i) for i in others}
    instance.pause()
    loop = asyncio.get_running_loop()
    stopped = loop.time()
    while loop.time() - stopped < SESSION_TIMEOUT_S + 5 or not any(
        _holds_all(r, i, seen[i.name]) for i in others
    ):
        if loop.time() - stopped > SESSION_TIMEOUT_S + 60:
            r.note("the group did not move the stopped instance's partitions within 70 s")
            break
        await r.reader.poll(200)
    waited = loop.time() - stopped
    assigned = _assignments(instance)
    r.zombie_log_at = (instance, len(instance.log_text()))
    instance.resume()
    r.note(f"{instance.name} resumed (SIGCONT) after {waited:.0f} s stopped; the others held its partitions")
    # its wake-up alone, before the next step: it finds itself out of the group and rejoins
    while _assignments(instance) == assigned and loop.time() - stopped < waited + 60:
        await r.reader.poll(200)
    rejoined = _assignments(instance) > assigned
    r.note(f"{instance.name} " + ("rejoined the group" if rejoined else "did not rejoin within 60 s"))


def zombie_evidence(instance: Instance, log_at: int) -> list[str]:
    """What the resumed instance logged about its partitions: fencing, failed commits, rebalances."""
    lines = instance.log_text()[log_at:].splitlines()
    return [line[:200] for line in lines if any(e in line for e in ZOMBIE_EVIDENCE)]


def kill_leader(of: str) -> Callable[[_Run], Awaitable[None]]:
    """kill -9 the node leading `of` ("jobs", "transactions" or "group"), restart it 5 s later,
    and wait until every replica is in sync again."""

    async def action(r: _Run) -> None:
        brokers = r.brokers
        if brokers is None:
            r.note("(no brokers of its own: leader kill skipped)")
            return
        jobs_topic = f"{r.prefix}.jobs"
        if of == "jobs":
            node, what = await brokers.leader_of(jobs_topic, 0), f"{jobs_topic}[0]"
        elif of == "transactions":
            transactional_id = f"{r.prefix}-group.{jobs_topic}.0"  # the service's default prefix: the group
            node = await brokers.coordinator_of(CoordinationType.TRANSACTION, transactional_id)
            what = f"the __transaction_state partition of {transactional_id}"
        else:
            node = await brokers.coordinator_of(CoordinationType.GROUP, f"{r.prefix}-group")
            what = "the __consumer_offsets partition of the group"
        r.note(f"node-{node} leads {what}: kill -9, restart in {BROKER_DOWN_S:.0f} s")
        await brokers.kill_and_restart(node, BROKER_DOWN_S)
        in_sync = await brokers.wait_in_sync([*r.topics, "__consumer_offsets", "__transaction_state"])
        r.note(
            f"node-{node} back; "
            + ("every replica in sync" if in_sync else "replicas NOT in sync after 120 s")
        )

    return action


async def scale_up(r: _Run) -> None:
    await r.new_instance().wait_for_log("partitions assigned", timeout=180)


async def scale_down(r: _Run) -> None:
    await asyncio.gather(*(i.stop() for i in r.instances[1:]))


def _assignments(instance: Instance) -> int:
    return instance.log_text().count("partitions assigned: ")


def _holds_all(r: _Run, instance: Instance, assignments_before: int) -> bool:
    """A later assignment of `instance` has every partition of the jobs topic."""
    lines = [line for line in instance.log_text().splitlines() if "partitions assigned: " in line]
    return any(line.count(f"{r.prefix}.jobs[") == r.s.partitions for line in lines[assignments_before:])


Action = Callable[["_Run"], Awaitable[None]]
SCENARIOS: dict[str, list[tuple[float, str, Action]]] = {
    "full": [
        (0.08, "kill -9 the leader of the jobs topic's partition 0", kill_leader("jobs")),
        (0.16, "kill -9 instance-1, restart in 3 s", lambda r: kill_and_restart(r, 0)),
        (
            0.26,
            "kill -9 the transaction coordinator (__transaction_state leader)",
            kill_leader("transactions"),
        ),
        (0.36, "SIGSTOP instance-2 past its session timeout, then SIGCONT", lambda r: zombie(r, 1)),
        (0.48, "kill -9 the group coordinator (__consumer_offsets leader)", kill_leader("group")),
        (0.58, "scale 2 -> 3 instances", scale_up),
        (0.72, "scale 3 -> 1 instance (SIGTERM)", scale_down),
    ],
    "short": [
        (
            0.05,
            "kill -9 instance-1, restart once instance-2 holds every partition",
            lambda r: kill_and_restart(r, 0, after_takeover=True),
        )
    ],
}
