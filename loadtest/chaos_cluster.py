"""The moving parts of a chaos run besides its brokers (loadtest/chaos_brokers.py): `python -m
service` instances it kill -9s, stops and restarts, and a read_committed reader of the results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Instance:
    """One `python -m service` process; restart() starts a new process with the same settings."""

    name: str
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen | None = None
    starts: int = 0
    started_at: float = 0.0  # time.monotonic() of the latest start
    log_path: Path = field(init=False)

    def start(self) -> None:
        self.starts += 1
        self.started_at = time.monotonic()
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        env = {**self.env, "SLUICE_HTTP_PORT": str(_free_port())}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process stands still (no heartbeat, no commit) until resume()."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: no drain, no commit."""
        if self.is_running:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def stop(self, timeout: float = 60) -> None:
        """SIGTERM: finish in-flight jobs, commit, leave the group (a scale-down)."""
        if not self.is_running:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.kill()

    def rss_mb(self) -> float | None:
        if not self.is_running:
            return None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        return kb / 1024

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if not self.is_running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {needle!r} not logged in {timeout}s")
            await asyncio.sleep(0.2)


class ResultsReader:
    """Reads the results topic as a user would (isolation_level=read_committed), from the start,
    through broker restarts: how often each custom_id was answered, and where."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.counts: Counter[str] = Counter()
        self.where: dict[str, list[tuple[int, int]]] = {}  # custom_id -> (partition, offset) of each copy
        self.errors: Counter[str] = Counter()  # error code -> error results
        self.error_codes: dict[str, str] = {}  # custom_id -> error code of its (last) error result

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 500) -> int:
        """Read what arrived; returns how many records. Broker errors only mean: nothing now."""
        try:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        except KafkaError:
            await asyncio.sleep(0.5)
            return 0
        n = 0
        for records in batches.values():
            for r in records:
                self._count(r)
                n += 1
        return n

    async def read_to_end(self, quiet_s: float = 5.0, timeout_s: float = 120) -> None:
        """Poll until nothing new has arrived for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            if await self.poll():
                last = time.monotonic()

    def _count(self, record) -> None:
        key = (record.key or b"").decode(errors="replace")
        self.counts[key] += 1
        self.where.setdefault(key, []).append((record.partition, record.offset))
        with contextlib.suppress(ValueError, AttributeError):
            error = json.loads(record.value).get("error")
            if error:
                self.errors[error.get("code", "?")] += 1
                self.error_codes[key] = error.get("code", "?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
