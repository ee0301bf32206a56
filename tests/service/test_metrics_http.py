"""/metrics, /healthz and /readyz of a running service, on the real broker."""

from __future__ import annotations

import asyncio
import json
import threading

import msgspec
import pytest

from service.metrics import ServiceMetrics

pytestmark = pytest.mark.kafka


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    status = int(response.split(" ", 2)[1])
    return status, response.split("\r\n\r\n", 1)[1]


def _value(metrics: str, name: str) -> float:
    line = next(
        line for line in metrics.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")
    )
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_count_jobs_tokens_and_errors_and_health_endpoints_answer(
    kafka, service_config, run_service
):
    good = {
        "custom_id": "m1",
        "url": "/v1/completions",
        "body": {"prompt": "hi", "max_tokens": 4, "ignore_eos": True},
    }
    await kafka.post(
        service_config.jobs_topics[0], [(b"m1", json.dumps(good).encode(), []), (b"bad", b"{oops", [])]
    )
    async with run_service(service_config) as service:
        await kafka.read(service_config.results_topic, 2)
        port = service.http.port
        assert await _get(port, "/healthz") == (200, "ok\n")
        assert await _get(port, "/readyz") == (200, "ok\n")
        assert (await _get(port, "/nope"))[0] == 404
        assert (await _get(port, "/metrics", method="POST"))[0] == 405
        await asyncio.sleep(0.1)  # the last job's counters are updated after its publish returns
        status, metrics = await _get(port, "/metrics")
    assert status == 200
    assert _value(metrics, "sluice_jobs_completed_total") == 1
    assert 'sluice_jobs_failed_total{code="invalid_encoding"} 1.0' in metrics
    assert _value(metrics, "sluice_dead_letters_total") == 1
    assert _value(metrics, "sluice_output_tokens_total") == 4
    assert _value(metrics, "sluice_job_latency_seconds_count") == 2
    assert _value(metrics, "sluice_jobs_in_flight") == 0
    assert _value(metrics, "sluice_consumer_lag") == 0
    assert 0 <= _value(metrics, "sluice_kv_cache_usage") <= 1
    # the engine is shared by the session's tests: its prefix-cache counters only grow
    assert _value(metrics, "sluice_prefix_cache_queried_tokens") >= 1
    assert (
        0
        <= _value(metrics, "sluice_prefix_cache_hit_tokens")
        <= _value(metrics, "sluice_prefix_cache_queried_tokens")
    )
    for name in (
        "sluice_engine_running",
        "sluice_engine_waiting",
        "sluice_consumer_paused",
        "sluice_tokens_in_flight",
        "sluice_lora_slot_hits_total",  # 0: the session's engine has no adapters
        "sluice_lora_slot_loads_total",
        "sluice_lora_load_seconds_total",
    ):
        assert name in metrics


def test_jobs_answered_reads_results_and_errors_back_from_the_counters():
    metrics = ServiceMetrics()
    assert metrics.jobs_answered == (0, 0)
    metrics.jobs_completed.inc()
    metrics.jobs_failed.labels("invalid_request").inc()
    metrics.jobs_failed.labels("deadline_exceeded").inc(2)
    assert metrics.jobs_answered == (4, 3)


async def test_healthz_fails_while_a_task_holds_the_tokenizer_thread_past_tokenizer_stall_s(
    service_config, run_service
):
    config = msgspec.structs.replace(service_config, tokenizer_stall_s=0.3)
    release = threading.Event()
    async with run_service(config) as service:
        port = service.http.port
        assert await _get(port, "/healthz") == (200, "ok\n")
        held = asyncio.ensure_future(service.handler._off_loop(release.wait, 30))  # a stuck task
        await asyncio.sleep(0.6)
        try:
            assert await _get(port, "/healthz") == (503, "not ready\n")
            assert _value((await _get(port, "/metrics"))[1], "sluice_tokenizer_busy_seconds") > 0.3
        finally:
            release.set()
            await held
        assert await _get(port, "/healthz") == (200, "ok\n")
