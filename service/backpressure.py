"""Backpressure: when to stop fetching jobs and when to start again (pure logic).

In-flight work is counted in jobs and in tokens (prompt + requested output); an embeddings job
counts one job per input, each an engine request of its own. Under exactly-once a
finished job's result waits in memory for its partition's next transaction (staged): those count
as jobs too, so that a slow job holding its partition's watermark, or transactions that keep
failing, cannot pile up results without bound. Past either high-water mark the consumer pauses its
partitions; it resumes only once both are below their
low-water marks. The gap between the marks keeps it from flapping on every finished job, and
the marks bound memory whatever the backlog in Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Backpressure:
    max_jobs: int  # high-water mark in jobs
    max_tokens: int  # high-water mark in tokens
    resume_fraction: float = 0.5  # low-water marks, as a fraction of the high-water marks
    jobs: int = 0
    tokens: int = 0
    staged: int = 0  # exactly-once: results staged for a transaction (set from outside, not add/remove)
    is_paused: bool = False
    peak_jobs: int = 0  # the most jobs ever in flight at once

    def add(self, tokens: int = 0, jobs: int = 0) -> None:
        self.jobs += jobs
        self.tokens += tokens
        self.peak_jobs = max(self.peak_jobs, self.jobs)

    def remove(self, tokens: int = 0, jobs: int = 0) -> None:
        self.jobs -= jobs
        self.tokens -= tokens

    @property
    def is_over_high_water(self) -> bool:
        return self.jobs + self.staged >= self.max_jobs or self.tokens >= self.max_tokens

    @property
    def is_under_low_water(self) -> bool:
        return (
            self.jobs + self.staged <= self.max_jobs * self.resume_fraction
            and self.tokens <= self.max_tokens * self.resume_fraction
        )

    def update(self) -> str | None:
        """ "pause" or "resume" when the state should change, else None."""
        if not self.is_paused and self.is_over_high_water:
            self.is_paused = True
            return "pause"
        if self.is_paused and self.is_under_low_water:
            self.is_paused = False
            return "resume"
        return None

    @property
    def free_jobs(self) -> int:
        return max(0, self.max_jobs - self.jobs - self.staged)
