"""Producer-set timestamps cannot skew metrics or drop spans; slow or many HTTP clients cannot
hold the health endpoint (no broker needed)."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.structs import ConsumerRecord
from opentelemetry.sdk.trace import TracerProvider

from service import http
from service.http import HealthServer
from service.records import job_timestamp_ms
from service.tracing import KafkaSpanExporter

NOW_MS = 1_800_000_000_000


def _record(timestamp: int, timestamp_type: int = 0) -> ConsumerRecord:
    return ConsumerRecord("jobs", 0, 0, timestamp, timestamp_type, None, b"", None, -1, 0, ())


@pytest.mark.parametrize(
    "timestamp", [-5, -1, 0, 1, NOW_MS - 30 * 86_400_000, NOW_MS + 3_600_000, 2**63 - 1, -(2**63)]
)
def test_an_implausible_record_timestamp_is_replaced_by_the_consume_time(timestamp):
    assert job_timestamp_ms(_record(timestamp), NOW_MS) == NOW_MS


@pytest.mark.parametrize("timestamp", [NOW_MS, NOW_MS - 3 * 86_400_000, NOW_MS + 10_000])
def test_a_plausible_record_timestamp_is_kept(timestamp):
    assert job_timestamp_ms(_record(timestamp), NOW_MS) == timestamp


def test_a_span_that_protobuf_cannot_hold_does_not_drop_the_others():
    sent: list[bytes] = []
    tracer = TracerProvider().get_tracer("test")
    good = tracer.start_span("good")
    good.end()
    bad = tracer.start_span("bad", start_time=-5_000_000)
    bad.end()
    assert KafkaSpanExporter(sent.append).export([good, bad]).name == "SUCCESS"
    (data,) = sent
    assert b"good" in data and b"bad" not in data


@pytest.fixture
async def health(monkeypatch):
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 4)
    server = HealthServer("127.0.0.1", 0, lambda: b"", lambda: True, lambda: True)
    await server.start()
    yield server
    await server.stop()


async def _healthz(port: int) -> bytes:
    """The answer to GET /healthz; b"" when the server closes the connection unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def _closed_by_server(reader: asyncio.StreamReader, wait: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), wait) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_client_dribbling_headers_is_cut_off_after_the_request_timeout(health):
    reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
    started = time.monotonic()
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    for _ in range(20):  # a header line every 0.2 s, never the end of the headers
        writer.write(b"X-Slow: 1\r\n")
        if await _closed_by_server(reader, 0.2):
            break
    assert 0.4 < time.monotonic() - started < 1.5  # closed at the 0.5 s request timeout
    writer.close()


async def test_connections_past_the_limit_are_closed_and_health_answers_once_idle_ones_time_out(health):
    idle = [await asyncio.open_connection("127.0.0.1", health.port) for _ in range(4)]
    await asyncio.sleep(0.05)
    assert await _healthz(health.port) == b""  # over the limit: closed unanswered
    await asyncio.sleep(0.6)  # the idle connections time out
    assert (await _healthz(health.port)).startswith(b"HTTP/1.1 200 OK")
    for _, writer in idle:
        writer.close()
