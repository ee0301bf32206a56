"""Prometheus metrics of one service instance, in a registry of its own.

Counters and histograms are updated as jobs finish; gauges that describe current state
(in-flight work, engine queue, KV-cache use, consumer lag) are read when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import EngineStats

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
        self.prompt_tokens = Counter("sluice_prompt_tokens", "Prompt tokens of answered jobs", registry=r)
        self.output_tokens = Counter("sluice_output_tokens", "Generated tokens of answered jobs", registry=r)
        self.latency = Histogram(
            "sluice_job_latency_seconds",
            "Kafka timestamp to result published",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "sluice_queue_wait_seconds",
            "Kafka timestamp to engine admission",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sluice_time_to_first_token_seconds",
            "Engine admission to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.admission_batch_size = Histogram(
            "sluice_admission_batch_size",
            "Jobs handed to the engine together by the dynamic batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    @property
    def jobs_answered(self) -> tuple[int, int]:
        """(results, of which errors) published so far: the counters above, read back."""
        errors = _total(self.jobs_failed)
        return _total(self.jobs_completed) + errors, errors

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

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
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels."""
    return int(sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))
