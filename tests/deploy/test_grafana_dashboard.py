"""deploy/grafana/sluice.json: a well-formed dashboard that queries only metrics Sluice exports."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from tests.service.conftest import kafka, run_service, service_config, tiny_engine  # noqa: F401 (fixtures)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sluice.json"
# What an operator must see at a glance (the list), by panel title.
REQUIRED_PANELS = {
    "Jobs per second",
    "Tokens per second",
    "End-to-end latency",
    "Queue wait",
    "Time to first token",
    "Batch size",
    "KV-cache usage",
    "Consumer lag",
    "Errors by code",
    "Dead letters",
}
_SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def _metric_names(exprs: list[str]) -> set[str]:
    """Sample names the PromQL expressions select (sluice_* identifiers)."""
    return {m for e in exprs for m in re.findall(r"\bsluice_[a-z0-9_]+", e)}


def test_dashboard_has_every_required_panel_each_with_a_query():
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["title"] for p in panels} >= REQUIRED_PANELS
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"  # the provisioned Prometheus, or a chosen one
    latency = next(p for p in panels if p["title"] == "End-to-end latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_dashboard_panels_have_unique_ids_and_do_not_overlap():
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        own = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not own & cells, f"{p['title']} overlaps another panel"
        cells |= own


@pytest.mark.kafka
async def test_every_metric_the_dashboard_queries_is_exported_by_a_running_service(
    kafka,  # noqa: F811
    service_config,  # noqa: F811
    run_service,  # noqa: F811
):
    job = {"custom_id": "d1", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 3}}
    # One good job and one undecodable record: the error and dead-letter series exist too.
    await kafka.post(service_config.jobs_topics[0], [(b"d1", json.dumps(job).encode(), []), (b"x", b"{", [])])
    async with run_service(service_config) as service:
        await kafka.read(service_config.results_topic, 2)
        await asyncio.sleep(0.1)  # counters are updated right after the publish is acknowledged
        exported = await _scrape(service.http.port)
    queried = _metric_names(_queries(_dashboard()))
    assert queried, "the dashboard queries no sluice_* metric"
    missing = sorted(m for m in queried if m not in exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    # Counters the dashboard rates moved, so its panels show data rather than zeros.
    assert exported["sluice_engine_steps_total"] > 0
    assert exported["sluice_engine_step_sequences_total"] >= exported["sluice_engine_steps_total"]
    assert exported["sluice_dead_letters_total"] == 1


async def _scrape(port: int) -> dict[str, float]:
    """Sample name -> value (the last sample of each name) from /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    body = (await reader.read()).decode().split("\r\n\r\n", 1)[1]
    writer.close()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            samples[name] = float(line.rsplit(" ", 1)[1])
    return samples
