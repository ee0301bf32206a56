"""At-least-once under a crash: kill -9 of one of two instances mid-burst loses no job."""

from __future__ import annotations

import asyncio
import json
import signal

import msgspec
import pytest

from engine import EngineConfig, LLMEngine
from tests.service.processes import service_env, start_service, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

NUM_JOBS = 2000


async def test_killing_an_instance_mid_burst_leaves_every_job_answered(
    kafka, kafka_bootstrap, topic_prefix, service_config, run_service, tiny_checkpoint, tmp_path
):
    c = service_config
    env = service_env(kafka_bootstrap, topic_prefix, topic_partitions=4, engine={"model": tiny_checkpoint})
    log_path = tmp_path / "victim.log"
    ids = [f"burst-{i}" for i in range(NUM_JOBS)]
    body = {"prompt": "The river", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    jobs = [
        (i.encode(), json.dumps({"custom_id": i, "url": "/v1/completions", "body": body}).encode(), [])
        for i in ids
    ]
    survivor_config = msgspec.structs.replace(c, topic_partitions=4)
    survivor_engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=256))
    victim = None
    try:
        async with run_service(survivor_config, engine=survivor_engine):  # creates the 4-partition topics
            victim = start_service(env, log_path)
            await wait_until(lambda: "partitions assigned" in log_path.read_text(), victim, log_path)
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
