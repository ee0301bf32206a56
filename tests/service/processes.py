"""`python -m service` as a child process, for the tests that kill, signal or run several real instances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(
    kafka_bootstrap: str, topic_prefix: str, engine: dict[str, object] | None = None, **settings: object
) -> dict[str, str]:
    """The environment of an instance on the test's topics (named as the service_config fixture
    names them) with an HTTP port of its own; `settings` set more service options and `engine`
    engine options: delivery="exactly_once", engine={"model": path} become SLUICE_DELIVERY,
    SLUICE_ENGINE_MODEL."""
    env = {
        **os.environ,
        "SLUICE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SLUICE_JOBS_TOPICS": f"{topic_prefix}.jobs",
        "SLUICE_RESULTS_TOPIC": f"{topic_prefix}.results",
        "SLUICE_DLQ_TOPIC": f"{topic_prefix}.dlq",
        "SLUICE_TRACES_TOPIC": f"{topic_prefix}.traces",
        "SLUICE_GROUP_ID": f"{topic_prefix}-group",
        "SLUICE_HTTP_HOST": "127.0.0.1",
        "SLUICE_HTTP_PORT": str(free_port()),
    }
    env.update({f"SLUICE_{name.upper()}": str(value) for name, value in settings.items()})
    env.update({f"SLUICE_ENGINE_{name.upper()}": str(value) for name, value in (engine or {}).items()})
    return env


def start_service(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m service` with stdout and stderr going to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


@contextlib.contextmanager
def running_service(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """start_service, ready for jobs; killed on the way out if the test left it running."""
    service = start_service(env, log_path)
    try:
        wait_for_line(log_path, "ready; Ctrl-C to stop", service, timeout=120)
        yield service
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def stop_with_ctrl_c(service: subprocess.Popen, log_path: Path) -> str:
    """SIGINT, as Ctrl-C sends it: the instance must exit 0; returns its log."""
    service.send_signal(signal.SIGINT)
    assert service.wait(timeout=60) == 0
    return log_path.read_text()


def submit_job(env: dict[str, str], job: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """`sluice submit` one job to the instance's topics; its result line comes back on stdout."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "submit", "--timeout", str(timeout)],
        input=json.dumps(job).encode(),
        env=env,
        capture_output=True,
        timeout=2 * timeout,
    )


def wait_for_line(log_path: Path, needle: str, process: subprocess.Popen, timeout: float) -> None:
    """Block until the instance logs `needle`; fail with its log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log_path.read_text():
            return
        _fail_if_exited(process, log_path)
        time.sleep(0.2)
    pytest.fail(f"{needle!r} not logged within {timeout}s:\n{log_path.read_text()[-3000:]}")


async def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen, log_path: Path, timeout: float = 120
) -> None:
    """wait_for_line's asyncio form for any condition: the event loop (a Service in-process) runs on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        _fail_if_exited(process, log_path)
        await asyncio.sleep(0.2)
    pytest.fail(f"condition not met within {timeout}s:\n{log_path.read_text()[-3000:]}")


def _fail_if_exited(process: subprocess.Popen, log_path: Path) -> None:
    if process.poll() is not None:
        pytest.fail(f"the service exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
