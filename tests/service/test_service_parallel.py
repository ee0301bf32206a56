"""`python -m service` on a tensor-parallel engine: jobs through Kafka, Ctrl-C, and a worker that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.service.processes import (
    running_service,
    service_env,
    start_service,
    stop_with_ctrl_c,
    submit_job,
    wait_for_line,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

JOB = {
    "custom_id": "tp-1",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"prompt": "Hello there", "max_tokens": 8},  # no model: the served one (a tiny-seed0 folder)
}


def _service_env(kafka_bootstrap: str, topic_prefix: str, checkpoint: Path, tp: int) -> dict[str, str]:
    env = service_env(
        kafka_bootstrap,
        topic_prefix,
        engine={"model": checkpoint, "kv_cache_memory_gib": 0.1, "tensor_parallel_size": tp},
    )
    return {**env, "OMP_NUM_THREADS": "1"}


def _start_service(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    service = start_service(env, log_path)
    wait_for_line(log_path, "ready; Ctrl-C to stop", service, timeout=120)
    return service


def test_service_answers_a_job_on_two_tensor_parallel_ranks_and_stops_them_on_ctrl_c(
    kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path
):
    env = _service_env(kafka_bootstrap, topic_prefix, tiny_checkpoint, tp=2)
    log_path = tmp_path / "service.log"
    with running_service(env, log_path) as service:
        workers = [pid for pid in _children(service.pid) if b"spawn_main" in _cmdline(pid)]
        assert len(workers) == 1  # rank 1
        submit = submit_job(env, JOB)
        assert submit.returncode == 0, submit.stderr.decode()
        result = json.loads(submit.stdout.decode())
        assert result["custom_id"] == "tp-1" and result["response"]["status_code"] == 200
        assert result["response"]["body"]["usage"]["completion_tokens"] == 8

        assert "stopped after 1 results (0 errors)" in stop_with_ctrl_c(service, log_path)
        assert not [pid for pid in workers if _is_running(pid)]


def test_a_dead_worker_stops_the_service_without_results_and_the_next_instance_redoes_its_jobs(
    kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path
):
    jobs = [
        {**JOB, "custom_id": f"job-{i}", "body": {**JOB["body"], "max_tokens": 400, "ignore_eos": True}}
        for i in range(4)
    ]
    first_env = _service_env(kafka_bootstrap, topic_prefix, tiny_checkpoint, tp=2)
    first_log = tmp_path / "first.log"
    first = _start_service(first_env, first_log)
    submit = second = None
    try:
        jobs_file = tmp_path / "jobs.jsonl"
        jobs_file.write_text("".join(json.dumps(job) + "\n" for job in jobs))
        submit = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "submit", "--timeout", "300", str(jobs_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=first_env,
        )
        metrics_url = f"http://127.0.0.1:{first_env['SLUICE_HTTP_PORT']}/metrics"
        _wait_until(lambda: "sluice_jobs_in_flight 4.0" in _read(metrics_url), timeout=60)
        (worker,) = [pid for pid in _children(first.pid) if b"spawn_main" in _cmdline(pid)]
        os.kill(worker, signal.SIGKILL)

        assert first.wait(timeout=60) == 1
        log = first_log.read_text()
        assert "parallel engine worker rank 1" in log and "unfinished jobs stay uncommitted" in log
        assert "engine_error" not in log  # no job was answered with the engine's failure

        # the group's next member (one process this time) finds the four jobs uncommitted
        second = _start_service(
            _service_env(kafka_bootstrap, topic_prefix, tiny_checkpoint, tp=1), tmp_path / "second.log"
        )
        out, err = submit.communicate(timeout=300)
        assert submit.returncode == 0, err.decode()
        results = [json.loads(line) for line in out.decode().splitlines()]
        assert sorted(r["custom_id"] for r in results) == [f"job-{i}" for i in range(4)]
        assert all(r["response"]["status_code"] == 200 for r in results)
        assert all(r["response"]["body"]["usage"]["completion_tokens"] == 400 for r in results)
    finally:
        for process in (submit, first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.05)


def _read(url: str) -> str:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return ""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
