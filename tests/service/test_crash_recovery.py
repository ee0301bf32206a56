"""At-least-once under a crash: kill -9 of one of two instances mid-burst loses no job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from engine import EngineConfig, LLMEngine

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

NUM_JOBS = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_killing_an_instance_mid_burst_leaves_every_job_answered(
    kafka, service_config, run_service, tiny_checkpoint, tmp_path
):
    c = service_config
    env = {
        **os.environ,
        "SLUICE_KAFKA_BOOTSTRAP": c.kafka_bootstrap,
        "SLUICE_JOBS_TOPICS": c.jobs_topics[0],
        "SLUICE_RESULTS_TOPIC": c.results_topic,
        "SLUICE_DLQ_TOPIC": c.dlq_topic,
        "SLUICE_TRACES_TOPIC": c.traces_topic,
        "SLUICE_GROUP_ID": c.group_id,
        "SLUICE_TOPIC_PARTITIONS": "4",
        "SLUICE_MODEL": str(tiny_checkpoint),
        "SLUICE_HTTP_HOST": "127.0.0.1",
        "SLUICE_HTTP_PORT": str(_free_port()),
    }
    log_path = tmp_path / "victim.log"
    ids = [f"burst-{i}" for i in range(NUM_JOBS)]
    body = {"prompt": "The river", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    jobs = [
        (i.encode(), json.dumps({"custom_id": i, "url": "/v1/completions", "body": body}).encode(), [])
        for i in ids
    ]
    survivor_config = c.__class__(
        **{**{f: getattr(c, f) for f in c.__struct_fields__}, "topic_partitions": 4}
    )
    survivor_engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), max_model_len=256))
    victim = None
    try:
        async with run_service(survivor_config, engine=survivor_engine):  # creates the 4-partition topics
            with open(log_path, "w") as log:
                victim = subprocess.Popen(
                    [sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            await _wait_for(lambda: "partitions assigned" in log_path.read_text(), victim, log_path)
            await kafka.post(c.jobs_topics[0], jobs)
            await kafka.read(c.results_topic, 200, timeout=120)  # both instances are at work
            victim.send_signal(signal.SIGKILL)  # no drain, no commit: its in-flight jobs are redone
            victim.wait(timeout=30)
            answered: set[str] = set()
            for _ in range(60):  # the survivor takes the victim's partitions once its session times out
                answered = {r.key.decode() for r in await kafka.read_all(c.results_topic, quiet=2.0)}
                if answered == set(ids):
                    break
                await asyncio.sleep(2)
        assert answered == set(ids), f"{len(set(ids) - answered)} jobs never answered"
        assert "stopped after" not in log_path.read_text()  # it was killed, not drained
    finally:
        if victim is not None and victim.poll() is None:
            victim.kill()
            victim.wait()


async def _wait_for(condition, process: subprocess.Popen, log_path, timeout: float = 120) -> None:
    for _ in range(int(timeout * 5)):
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"the victim exited early:\n{log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.2)
    pytest.fail(f"the victim never joined the group:\n{log_path.read_text()[-3000:]}")
