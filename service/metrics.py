"""Prometheus metrics of one service instance, in a registry of its own.

Counters and histograms are updated as jobs finish; gauges that describe current state
(in-flight work, engine queue, KV-cache use, consumer lag) are read when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import EngineStats

if TYPE_CHECKING:
    from service.jobs import Outcome

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600, 1800)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_consumed = Counter("sluice_jobs_consumed", "Job records consumed", ["topic"], registry=r)
        self.jobs_completed = Counter("sluice_jobs_completed", "Jobs answered with a result", registry=r)
        self.jobs_failed = Counter(
            "sluice_jobs_failed", "Jobs answered with an error result", ["code"], registry=r
        )
        self.dead_letters = Counter(
            "sluice_dead_letters", "Records sent to the dead-letter topic", registry=r
        )
        self.fetch_failures = Counter(
            "sluice_fetch_failures",
            "Failed fetches of jobs: fetch_error (a fetch raised), undecodable_batch (a read of a batch that did not decode)",
            ["reason"],
            registry=r,
        )
        for reason in ("fetch_error", "undecodable_batch"):  # at 0 from the first scrape
            self.fetch_failures.labels(reason)
        self.prompt_tokens = Counter("sluice_prompt_tokens", "Prompt tokens of answered jobs", registry=r)
        self.output_tokens = Counter("sluice_output_tokens", "Generated tokens of answered jobs", registry=r)
        self.latency = _seconds_histogram(
            "sluice_job_latency_seconds", "Kafka timestamp to result published", r
        )
        self.queue_wait = _seconds_histogram(
            "sluice_queue_wait_seconds", "Kafka timestamp to engine admission", r
        )
        self.ttft = _seconds_histogram(
            "sluice_time_to_first_token_seconds", "Engine admission to first token", r
        )
        self.admission_batch_size = Histogram(
            "sluice_admission_batch_size",
            "Jobs handed to the engine together by the dynamic batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def count(self, outcome: Outcome, timestamp_ms: int) -> None:
        """A job's outcome was delivered; `timestamp_ms`: when the job was produced."""
        self.latency.observe(max(0.0, time.time() - timestamp_ms / 1000))
        if outcome.is_error:
            self.jobs_failed.labels(outcome.result.failure.code).inc()
            self.dead_letters.inc()
        else:
            self.jobs_completed.inc()
        if (out := outcome.output) is not None:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.output_tokens.inc(sum(len(s.token_ids) for s in out.samples or [out]))  # every choice's
            self.queue_wait.observe(max(0.0, out.metrics.arrival_time - timestamp_ms / 1000))
            if out.metrics.first_token_time is not None:
                self.ttft.observe(max(0.0, out.metrics.first_token_time - out.metrics.arrival_time))

    @property
    def jobs_answered(self) -> tuple[int, int]:
        """(results, of which errors) published so far: the counters above, read back."""
        errors = _total(self.jobs_failed)
        return _total(self.jobs_completed) + errors, errors

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def partition_gauge(self, name: str, documentation: str, read: Callable[[], dict]) -> None:
        """A gauge per partition (labels topic, partition), from a {TopicPartition: value} read at scrape time."""
        self.registry.register(_PartitionGauge(name, documentation, read))

    def engine(self, read_stats: Callable[[], EngineStats]) -> None:
        """The engine's gauges and step totals, from one stats() snapshot per scrape."""
        self.registry.register(_EngineCollector(read_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, read_stats: Callable[[], EngineStats]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._read_stats()
        steps = stats.steps
        gauges = (
            ("sluice_engine_running", "Sequences in the engine's running batch", stats.num_running_seqs),
            ("sluice_engine_waiting", "Sequences waiting for the engine", stats.num_waiting_seqs),
            ("sluice_kv_cache_usage", "Share of KV-cache blocks in use", stats.kv_cache_usage),
            (
                "sluice_prefix_cache_queried_tokens",
                "Prompt tokens looked up in the prefix cache (since start)",
                stats.prefix_cache_queried_tokens,
            ),
            (
                "sluice_prefix_cache_hit_tokens",
                "Prompt tokens found in the prefix cache, not recomputed (since start)",
                stats.prefix_cache_hit_tokens,
            ),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        # rate(sequences) / rate(steps) is the mean batch size
        counters = (
            ("sluice_engine_steps", "Engine steps run", steps.num_steps),
            (
                "sluice_engine_step_sequences",
                "Sequences scheduled, summed over engine steps (the batch sizes)",
                steps.num_step_seqs,
            ),
            (
                "sluice_engine_step_tokens",
                "Tokens computed (prompt chunks + decodes), summed over engine steps",
                steps.num_step_tokens,
            ),
            ("sluice_engine_preemptions", "Sequences preempted for KV-cache blocks", steps.num_preemptions),
            (
                "sluice_lora_slot_hits",
                "LoRA adapters a step found resident in a slot (once per step that runs each)",
                stats.lora_slot_hits,
            ),
            (
                "sluice_lora_slot_loads",
                "LoRA adapters loaded into a slot (not resident, or evicted since)",
                stats.lora_slot_loads,
            ),
            (
                "sluice_lora_load_seconds",
                "Time spent loading LoRA adapters into slots",
                stats.lora_load_seconds,
            ),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)


class _PartitionGauge(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], dict]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=["topic", "partition"])
        for tp, value in sorted(self._read().items()):
            family.add_metric([tp.topic, str(tp.partition)], value)
        yield family


def _seconds_histogram(name: str, documentation: str, registry: CollectorRegistry) -> Histogram:
    return Histogram(name, documentation, buckets=_LATENCY_BUCKETS, registry=registry)


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels."""
    return int(sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))
