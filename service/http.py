"""A minimal HTTP endpoint on the event loop: /metrics (Prometheus text), /healthz, /readyz.

Liveness: the event loop answers, the engine thread is alive and no task has held the tokenizer
thread past tokenizer_stall_s (Service.is_live). Readiness: the service has started consuming.
Anything else is 404. No framework: three GET routes do not need one.
A client gets REQUEST_TIMEOUT_S for its whole request and MAX_HEADER_LINES header lines, and at
most MAX_CONNECTIONS are served at once (more are closed at once): slow or many clients cannot
hold the event loop's sockets and memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
REQUEST_TIMEOUT_S = 5.0  # to read the request line and headers, and to send the answer
MAX_HEADER_LINES = 100
MAX_CONNECTIONS = 32


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Callable[[], bytes],
        is_live: Callable[[], bool],
        is_ready: Callable[[], bool],
    ) -> None:
        self._host, self._port = host, port
        self._routes = {
            "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics()),
            "/healthz": lambda: _status(is_live()),
            "/readyz": lambda: _status(is_ready()),
        }
        self._server: asyncio.Server | None = None
        self._num_connections = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._num_connections += 1
        try:
            if self._num_connections <= MAX_CONNECTIONS:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await self._answer(reader, writer)
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a client that sends garbage, is too slow or goes away gets nothing
        finally:
            self._num_connections -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        for _ in range(MAX_HEADER_LINES + 1):
            if await reader.readline() in (b"\r\n", b"\n", b""):
                break  # headers: nothing here needs them
        else:
            raise ValueError("too many header lines")
        method, path, *_ = request_line.decode("latin-1").split() or ["", ""]
        route = self._routes.get(path.split("?")[0])
        if route is None:
            status, content_type, body = 404, "text/plain", b"not found\n"
        elif method != "GET":
            status, content_type, body = 405, "text/plain", b"GET only\n"
        else:
            status, content_type, body = route()
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()


def _status(ok: bool) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"not ready\n")
