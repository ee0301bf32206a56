"""Running `sluice label` / `sluice batch` as a user does: a separate process, configured by SLUICE_* variables."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from service.config import ServiceConfig


def sluice_env(config: ServiceConfig) -> dict[str, str]:
    """The environment that points the command (and a service process) at the test's topics and model."""
    return {
        **os.environ,
        "SLUICE_KAFKA_BOOTSTRAP": config.kafka_bootstrap,
        "SLUICE_JOBS_TOPICS": config.jobs_topics[0],
        "SLUICE_RESULTS_TOPIC": config.results_topic,
        "SLUICE_DLQ_TOPIC": config.dlq_topic,
        "SLUICE_TRACES_TOPIC": config.traces_topic,
        "SLUICE_GROUP_ID": config.group_id,
        "SLUICE_ENGINE_MODEL": config.engine.model,
        "SLUICE_ENGINE_DTYPE": config.engine.dtype,
        "SLUICE_MODEL_NAME": config.model_name,
        "SLUICE_HTTP_HOST": "127.0.0.1",
        "SLUICE_HTTP_PORT": "0",
        "OMP_NUM_THREADS": "1",
    }


def sluice_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


async def run_sluice(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the command to its end without blocking the event loop (a Service may be running on it)."""
    return await asyncio.to_thread(
        subprocess.run, sluice_command(*args), env=env, capture_output=True, text=True, timeout=timeout
    )
