"""Samples a service's /metrics during a load run: the engine's batch size and KV-cache use over time."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(slots=True)
class MetricsSample:
    t: float  # wall-clock seconds (time.time())
    steps: float  # sluice_engine_steps_total
    step_sequences: float  # sluice_engine_step_sequences_total
    kv_cache_usage: float  # sluice_kv_cache_usage


def mean_batch_sizes(samples: list[MetricsSample]) -> list[tuple[float, float, float]]:
    """(start, end, mean sequences per engine step) for each interval between samples with steps in it."""
    spans = []
    for a, b in itertools.pairwise(samples):
        if b.steps > a.steps:
            spans.append((a.t, b.t, (b.step_sequences - a.step_sequences) / (b.steps - a.steps)))
    return spans


async def sample_metrics(url: str, into: list[MetricsSample], interval_s: float = 0.25) -> None:
    """Append a sample every `interval_s` until cancelled (an unreachable endpoint is skipped)."""
    while True:
        try:
            values = parse_metrics(await fetch(url))
            into.append(
                MetricsSample(
                    time.time(),
                    values["sluice_engine_steps_total"],
                    values["sluice_engine_step_sequences_total"],
                    values.get("sluice_kv_cache_usage", 0.0),
                )
            )
        except (OSError, KeyError, ValueError):
            pass
        await asyncio.sleep(interval_s)


async def fetch(url: str) -> str:
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(parts.hostname, parts.port or 80), timeout=5
    )
    try:
        writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}\r\n\r\n".encode())
        await writer.drain()
        response = (await asyncio.wait_for(reader.read(), timeout=5)).decode()
    finally:
        writer.close()
    return response.split("\r\n\r\n", 1)[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text format, by name."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
