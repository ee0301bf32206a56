"""Shared fixtures: the tiny test checkpoint, the real local Kafka broker, unique topic names."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = Path(os.environ.get("SLUICE_BUILD_DIR", REPO_ROOT / "build"))


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run where CUDA is; elsewhere they are reported as skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skipif(True, reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


def pytest_terminal_summary(terminalreporter) -> None:
    """Where the image builds' time went (tests/deploy/podman.py times each), beside --durations."""
    podman = sys.modules.get("tests.deploy.podman")
    if podman is None or not podman.BUILD_TIMES:
        return
    terminalreporter.write_sep("=", "container image builds")
    for image, outcome, seconds in podman.BUILD_TIMES:
        terminalreporter.write_line(f"{seconds:8.1f}s {outcome:7} {image}")
    total = sum(seconds for _, _, seconds in podman.BUILD_TIMES)
    terminalreporter.write_line(f"{total:8.1f}s in all")


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where test checkpoints are built once per machine and then reused."""
    return BUILD_DIR / "test-models"


@pytest.fixture(scope="session")
def tiny_checkpoint(model_cache) -> Path:
    """The `tiny` preset, built once per machine under build/ and then reused."""
    from engine.demo.checkpoints import ensure_checkpoint

    return ensure_checkpoint(model_cache, preset="tiny", seed=0)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The real broker that `make test` starts (deploy/kafka/kafka.sh). Never a mock."""
    bootstrap = os.environ.get("SLUICE_TEST_KAFKA", f"127.0.0.1:{os.environ.get('KAFKA_PORT', '19092')}")
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as e:
        pytest.fail(
            f"no Kafka broker at {bootstrap} ({e}); run the tests with `make test` or start one with `make kafka-up`"
        )
    return bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """A fresh prefix per test, so tests never see each other's records."""
    return f"test-{uuid.uuid4().hex[:10]}"
