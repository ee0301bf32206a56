"""`python -m service` on a tensor-parallel engine: a job through Kafka, then Ctrl-C stops it and its workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

JOB = {
    "custom_id": "tp-1",
    "method": "POST",
    "url": "/v1/completions",
    "body": {"model": "demo", "prompt": "Hello there", "max_tokens": 8},
}


def test_service_answers_a_job_on_two_tensor_parallel_ranks_and_stops_them_on_ctrl_c(
    kafka_bootstrap, topic_prefix, tiny_checkpoint, tmp_path
):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SLUICE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SLUICE_JOBS_TOPICS": f"{topic_prefix}.jobs",
        "SLUICE_RESULTS_TOPIC": f"{topic_prefix}.results",
        "SLUICE_DLQ_TOPIC": f"{topic_prefix}.dlq",
        "SLUICE_TRACES_TOPIC": f"{topic_prefix}.traces",
        "SLUICE_GROUP_ID": f"{topic_prefix}-group",
        "SLUICE_MODEL": str(tiny_checkpoint),
        "SLUICE_KV_CACHE_MEMORY_GIB": "0.1",
        "SLUICE_TENSOR_PARALLEL_SIZE": "2",
        "SLUICE_HTTP_HOST": "127.0.0.1",
        "SLUICE_HTTP_PORT": str(_free_port()),
    }
    log_path = tmp_path / "service.log"
    with open(log_path, "w") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_line(log_path, "ready; Ctrl-C to stop", service, timeout=120)
        workers = _children(service.pid)
        assert len(workers) >= 1  # rank 1 (and multiprocessing's resource tracker)
        submit = subprocess.run(
            [sys.executable, "-m", "service.cli", "submit", "--timeout", "60"],
            input=json.dumps(JOB).encode(),
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stderr.decode()
        result = json.loads(submit.stdout.decode())
        assert result["custom_id"] == "tp-1" and result["response"]["status_code"] == 200
        assert result["response"]["body"]["usage"]["completion_tokens"] == 8

        service.send_signal(signal.SIGINT)
        assert service.wait(timeout=60) == 0
        assert "stopped after 1 results (0 errors)" in log_path.read_text()
        assert not [pid for pid in workers if _is_running(pid)]
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(log_path: Path, needle: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log_path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{needle!r} not logged within {timeout}s:\n{log_path.read_text()[-3000:]}")


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
