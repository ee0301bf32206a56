"""`python -m service` as a process: a record whose header key is not UTF-8 no longer kills it, and
a job's hostile chat template neither stops it, holds its shutdown nor outlives it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.service.hostile import RawRecord, post_raw
from tests.service.processes import (
    running_service,
    service_env,
    stop_with_ctrl_c,
    submit_job,
)
from tests.service.test_template_sandbox import NESTED_LOOP

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


def _template_workers(pid: int) -> list[int]:
    """The template sandbox processes `pid` started that are still alive."""
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"service.template_worker" in cmdline:
            workers.append(int(entry.name))
    return workers


def _wait_for(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _loop_job(custom_id: str) -> bytes:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": NESTED_LOOP}
    return json.dumps({"custom_id": custom_id, "url": "/v1/chat/completions", "body": body}).encode()


def test_a_hostile_chat_template_gets_its_error_and_the_process_keeps_serving(
    kafka, kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path
):
    env = service_env(
        kafka_bootstrap,
        topic_prefix,
        engine={"model": str(tiny_checkpoint)},
        allow_job_chat_template="true",
        chat_template_timeout_s=1,
    )
    log_path = tmp_path / "service.log"
    with running_service(env, log_path) as service:
        asyncio.run(post_raw(kafka_bootstrap, f"{topic_prefix}.jobs", 0, [RawRecord(_loop_job("loop"))]))
        submit = submit_job(env, JOB)
        assert submit.returncode == 0, submit.stderr.decode()
        assert json.loads(submit.stdout)["custom_id"] == "after-the-bad-key"
        (dead,) = asyncio.run(kafka.read(f"{topic_prefix}.dlq", 1))
        assert dict(dead.headers)["sluice-error-code"] == b"limit_exceeded"
        assert service.poll() is None
        assert _wait_for(lambda: len(_template_workers(service.pid)) == 2)  # the killed one replaced

        assert "stopped after 2 results (1 errors)" in stop_with_ctrl_c(service, log_path)


@pytest.mark.parametrize("stop", ["ctrl-c", "kill-9"])
def test_a_render_stuck_for_an_hour_neither_holds_the_process_nor_outlives_it(
    kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path, stop
):
    env = service_env(
        kafka_bootstrap,
        topic_prefix,
        engine={"model": str(tiny_checkpoint)},
        allow_job_chat_template="true",
        chat_template_timeout_s=3600,
        drain_timeout_s=1,
    )
    log_path = tmp_path / "service.log"
    with running_service(env, log_path) as service:
        workers = _template_workers(service.pid)
        asyncio.run(post_raw(kafka_bootstrap, f"{topic_prefix}.jobs", 0, [RawRecord(_loop_job("loop"))]))
        busy = lambda: any(_cpu_ticks(pid) > 50 for pid in workers)  # noqa: E731 -- half a second of CPU
        assert _wait_for(busy), "no sandbox process took up the render"
        started = time.monotonic()
        if stop == "ctrl-c":
            stop_with_ctrl_c(service, log_path)  # exits 0
        else:
            service.kill()
            service.wait()
        assert time.monotonic() - started < 30
        assert _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime
