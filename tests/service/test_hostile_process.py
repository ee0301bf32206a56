"""`python -m service` as a process: a record whose header key is not UTF-8 no longer kills it."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.service.hostile import RawRecord, post_raw
from tests.service.processes import (
    running_service,
    service_env,
    stop_with_ctrl_c,
    submit_job,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

JOB = {"custom_id": "after-the-bad-key", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}}


def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_the_process_keeps_serving(
    kafka, kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path
):
    env = service_env(kafka_bootstrap, topic_prefix, engine={"model": str(tiny_checkpoint)})
    log_path = tmp_path / "service.log"
    with running_service(env, log_path) as service:
        bad = RawRecord(json.dumps({**JOB, "custom_id": "bad-key"}).encode(), headers=[(b"\xc3\x28", b"v")])
        asyncio.run(post_raw(kafka_bootstrap, f"{topic_prefix}.jobs", 0, [bad]))
        submit = submit_job(env, JOB)
        assert submit.returncode == 0, submit.stderr.decode()
        assert json.loads(submit.stdout)["custom_id"] == "after-the-bad-key"
        (dead,) = asyncio.run(kafka.read(f"{topic_prefix}.dlq", 1))
        assert dict(dead.headers)["sluice-error-code"] == b"invalid_encoding"
        assert service.poll() is None

        assert "stopped after 2 results (1 errors)" in stop_with_ctrl_c(service, log_path)
