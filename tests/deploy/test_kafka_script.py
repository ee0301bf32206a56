"""deploy/kafka/kafka.sh: idempotent start, loud failures with the broker's log tail, clean stop."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"
pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kafka(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KAFKA_SH), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def scratch_build(tmp_path) -> Path:
    """A build folder of its own that reuses the already fetched broker jars."""
    shared = REPO_ROOT / "build" / "kafka"
    libs = sorted(shared.glob("libs-*"))
    assert libs, "the broker's jars are fetched by `make test` before the tests run"
    (tmp_path / "kafka").mkdir()
    for lib in libs:
        (tmp_path / "kafka" / lib.name).symlink_to(lib)
    return tmp_path


def test_start_when_the_broker_already_runs_does_nothing(kafka_bootstrap):
    port = kafka_bootstrap.rsplit(":", 1)[1]
    result = _kafka("start", KAFKA_PORT=port)
    assert result.returncode == 0
    assert "already running" in result.stderr


def test_a_broker_that_cannot_start_fails_loudly_with_its_log_tail(kafka_bootstrap, scratch_build):
    # The controller port is taken by the running test broker, so this broker dies at start-up.
    taken = kafka_bootstrap.rsplit(":", 1)[1]
    result = _kafka(
        "start",
        KAFKA_PORT=str(_free_port()),
        KAFKA_CONTROLLER_PORT=taken,
        SLUICE_BUILD_DIR=str(scratch_build),
    )
    assert result.returncode != 0
    assert "exited during start-up" in result.stderr
    assert "----- last lines of" in result.stderr


def test_a_broker_that_is_not_up_within_the_timeout_is_killed_and_reported(scratch_build):
    port = _free_port()
    env = dict(
        KAFKA_PORT=str(port), KAFKA_CONTROLLER_PORT=str(_free_port()), SLUICE_BUILD_DIR=str(scratch_build)
    )
    result = _kafka("start", KAFKA_START_TIMEOUT="1", **env)
    assert result.returncode != 0
    assert "did not come up within 1s" in result.stderr
    assert _kafka("status", **env).returncode != 0


@pytest.mark.slow
def test_a_second_broker_starts_answers_and_stops_cleanly(scratch_build):
    env = dict(
        KAFKA_PORT=str(_free_port()),
        KAFKA_CONTROLLER_PORT=str(_free_port()),
        SLUICE_BUILD_DIR=str(scratch_build),
    )
    try:
        assert _kafka("start", **env).returncode == 0
        assert _kafka("status", **env).returncode == 0
        socket.create_connection(("127.0.0.1", int(env["KAFKA_PORT"])), timeout=2).close()
    finally:
        stopped = _kafka("stop", **env)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    assert _kafka("status", **env).returncode != 0
