"""A chaos run's settings and its report: what was lost, what was repeated, memory over time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MODES = ("exactly_once", "at_least_once")
WARM_S = 30.0  # an instance's memory counts from this long after its start (torch and the model loaded)


@dataclass
class Settings:
    delivery: str
    jobs: int = 3000
    scenario: str = "full"  # "full" or "short"
    bootstrap: str | None = None  # a cluster to use (never killed); None: the run's own
    brokers: int = 3  # KRaft nodes of the run's own cluster
    broker_port: int = 39092  # its first node's; the others two ports up each (controllers one above)
    hostile: bool = True  # hostile records (loadtest/chaos_hostile.py) among the jobs
    partitions: int = 4
    max_tokens: int = 64  # per job: with max_in_flight, what keeps the flow going while things break
    max_in_flight: int = 64  # per instance
    commit_interval_ms: int = 200
    timeout_s: float = 840
    post_rate: float | None = None  # jobs/s posted while things break; None: all at once (a backlog)

    @classmethod
    def short(cls, delivery: str, bootstrap: str | None = None) -> Settings:
        """`make test`'s: a few hundred jobs posted over 30 s, faster than one instance answers them,
        so that partitions move with jobs in flight and more waiting, however fast the machine."""
        return cls(
            delivery, 250, "short", bootstrap, 1, max_tokens=128, max_in_flight=16, timeout_s=240, post_rate=8
        )


@dataclass
class Report:
    settings: Settings
    answered: int = 0  # distinct custom_ids read
    lost: int = 0
    duplicated: int = 0  # custom_ids read more than once
    extra_copies: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> error results of the ordinary jobs
    hostile_posted: int = 0
    hostile_answered: int = 0  # hostile records with a dead letter (read_committed)
    hostile_repeated: int = 0  # of them, dead-lettered more than once
    hostile_error_results: int = 0  # result lines whose custom_id is no ordinary job's
    hostile_codes: dict[str, str] = field(default_factory=dict)  # what it was -> its dead letter's error code
    other_dead_letters: int = 0  # dead letters of ordinary jobs
    commits_back: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, partition, from, to)
    zombie: list[str] = field(default_factory=list)  # the resumed instance's log about its partitions
    seconds: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)
    memory: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)  # (t, answered, MB)
    memory_warm: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # per process: RSS range once warm
    # duplicated custom_ids: (partition, offset) of each copy
    examples: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # partitions revoked and assigned straight back to the same process: (instance, how many, jobs aborted)
    handbacks: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        once = self.settings.delivery != "exactly_once" or self.duplicated == self.hostile_repeated == 0
        hostile_answered = self.hostile_answered == self.hostile_posted
        return self.lost == 0 and once and not self.errors and hostile_answered and not self.commits_back

    def summary(self) -> str:
        s = self.settings
        lines = [
            f"{s.delivery}: {s.jobs} jobs, {s.scenario} scenario, {self.seconds:.0f} s: answered {self.answered},"
            f" lost {self.lost}, duplicated {self.duplicated} ({self.extra_copies} extra copies),"
            f" error results {sum(self.errors.values())}, hostile answered {self.hostile_answered} of"
            f" {self.hostile_posted} ({self.hostile_repeated} more than once; {self.hostile_error_results}"
            f" error results), committed offsets moved back"
            f" {len(self.commits_back)} times -> {'PASS' if self.ok else 'FAIL'}"
        ]
        lines += [f"  {t:6.1f}s  {what}" for t, what in self.events]
        lines += [f"  duplicate {k}: (partition, offset) {v}" for k, v in list(self.examples.items())[:5]]
        lines += [f"  hostile: {what} -> {code}" for what, code in self.hostile_codes.items()]
        if self.other_dead_letters:
            lines.append(f"  dead letters of ordinary jobs: {self.other_dead_letters}")
        lines += [
            f"  {t:6.1f}s partition {p}: committed offset {a} -> {b}" for t, p, a, b in self.commits_back
        ]
        lines += [f"  zombie: {line}" for line in self.zombie[:12]]
        lines += [
            f"  {name}: {n} partitions revoked and handed straight back, {aborted} jobs in flight aborted"
            for name, n, aborted in self.handbacks
        ]
        lines.append("  memory (RSS MB per instance) over time:")
        step = max(1, len(self.memory) // 20)
        for t, answered, rss in self.memory[::step] + self.memory[-1:]:
            cells = "  ".join(f"{name} {mb:5.0f}" for name, mb in sorted(rss.items()))
            lines.append(f"  {t:6.1f}s {answered:6d} answered  {cells}")
        for name, (low, high) in sorted(self.memory_warm.items()):
            lines.append(f"  {name}: {low:.0f}-{high:.0f} MB from {WARM_S:.0f} s after its start to its end")
        return "\n".join(lines)


def handbacks(log: str) -> list[tuple[int, int]]:
    """Per rebalance of one instance's log that gave it back partitions it had: (how many, jobs aborted)."""
    out, revoked, aborted = [], set(), 0
    for line in log.splitlines():
        if "partitions revoked: " in line:
            revoked, aborted = set(line.split("partitions revoked: ")[1].split(", ")), 0
        elif (m := re.search(r"aborting (\d+) in-flight jobs", line)) and revoked:
            aborted += int(m.group(1))
        elif "partitions assigned: " in line and revoked:
            back = revoked & set(line.split("partitions assigned: ")[1].split(", "))
            if back:
                out.append((len(back), aborted))
            revoked = set()
    return out
