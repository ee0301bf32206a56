"""`python -m service` as `make run` starts it: demo model, topics, a job via `sluice submit`, Ctrl-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.service.processes import (
    running_service,
    service_env,
    stop_with_ctrl_c,
    submit_job,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

JOB = {
    "custom_id": "hello-1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
}


def test_service_builds_demo_model_answers_a_submitted_job_and_stops_cleanly_on_ctrl_c(
    kafka_bootstrap, topic_prefix, tmp_path
):
    # No model configured: the demo model is built under the build folder.
    env = service_env(kafka_bootstrap, topic_prefix, build_dir=tmp_path / "build", engine={"model": ""})
    http_port = env["SLUICE_HTTP_PORT"]
    log_path = tmp_path / "service.log"
    with running_service(env, log_path) as service:
        assert (tmp_path / "build" / "models" / "tiny-seed0" / "config.json").is_file()
        submit = submit_job(env, JOB)
        assert submit.returncode == 0, submit.stderr.decode()
        (line,) = submit.stdout.decode().splitlines()
        result = json.loads(line)
        assert result["custom_id"] == "hello-1" and result["response"]["status_code"] == 200
        assert result["response"]["body"]["object"] == "chat.completion"

        assert urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10).status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        assert "sluice_jobs_completed_total 1.0" in metrics

        assert "stopped after 1 results (0 errors)" in stop_with_ctrl_c(service, log_path)


def test_submit_reports_jobs_without_custom_id(kafka_bootstrap):
    submit = subprocess.run(
        [sys.executable, "-m", "service.cli", "submit", "--bootstrap", kafka_bootstrap],
        input=b'{"url": "/v1/completions", "body": {"prompt": "x"}}\n',
        capture_output=True,
        timeout=60,
    )
    assert submit.returncode == 2
    assert b"line 1 has no custom_id" in submit.stderr


def test_a_model_folder_that_cannot_load_stops_start_up_with_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    env = {**os.environ, "SLUICE_ENGINE_MODEL": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "cannot start the engine" in result.stderr and "GPT2LMHeadModel" in result.stderr
    assert "Traceback" not in result.stderr
