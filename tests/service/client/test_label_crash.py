"""A 1,000-row labelling run killed mid-way (kill -9 of the command, or of the service) and
resumed writes every row exactly once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from tests.service.client.label_helpers import run_sluice, sluice_command, sluice_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

NUM_ROWS = 1000
KILL_AFTER = 150  # output lines before the kill: mid-way, whatever the machine's speed


def _write_rows(path) -> set[str]:
    ids = [f"row-{i}" for i in range(NUM_ROWS)]
    path.write_text("".join(json.dumps({"id": i, "text": f"item {i}"}) + "\n" for i in ids))
    return set(ids)


def _label_args(rows, out) -> list[str]:
    return [
        "label", str(rows), "--template", "Label {text}:", "--id-column", "id", "--max-tokens", "2",
        "--output", str(out), "--no-progress", "--idle-timeout", "120",
    ]  # fmt: skip


def _count_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def _wait_for_lines(
    path, count: int, process: subprocess.Popen, log_path, timeout: float = 180
) -> None:
    for _ in range(int(timeout * 20)):
        if _count_lines(path) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the command ended early ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.05)
    pytest.fail(f"{path} did not reach {count} lines in {timeout}s:\n{log_path.read_text()[-3000:]}")


def _assert_each_row_exactly_once(out, ids: set[str]) -> None:
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    written = [line["row_id"] for line in lines]
    assert len(written) == len(set(written)), "a row was written twice"
    assert set(written) == ids
    assert all(line["error"] is None and line["label"] is not None for line in lines)


async def test_killing_the_command_mid_run_and_rerunning_it_writes_each_row_once(
    service_config, run_service, tmp_path
):
    ids = _write_rows(rows := tmp_path / "rows.jsonl")
    out, log_path = tmp_path / "labels.jsonl", tmp_path / "command.log"
    env = sluice_env(service_config)
    async with run_service(service_config):
        with open(log_path, "w") as log:
            command = subprocess.Popen(sluice_command(*_label_args(rows, out)), env=env, stderr=log)
        try:
            await _wait_for_lines(out, KILL_AFTER, command, log_path)
        finally:
            command.kill()  # SIGKILL: no clean-up, jobs in flight, maybe a torn last line
            command.wait()
        killed_at = _count_lines(out)
        assert killed_at < NUM_ROWS, "the run ended before the kill; the test proves nothing"
        with open(out, "ab") as f:
            f.write(b'{"row_id":"row-999","lab')  # as a kill mid-write leaves it
        resumed = await run_sluice(*_label_args(rows, out), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {killed_at} of {NUM_ROWS} rows done" in resumed.stderr
    _assert_each_row_exactly_once(out, ids)
    assert not out.with_name("labels.jsonl.run").exists()


async def test_killing_the_service_mid_run_lets_the_command_finish_on_another_instance(
    service_config, run_service, tmp_path
):
    ids = _write_rows(rows := tmp_path / "rows.jsonl")
    out, log_path, service_log = tmp_path / "labels.jsonl", tmp_path / "command.log", tmp_path / "service.log"
    env = sluice_env(service_config)
    with open(service_log, "w") as log:
        victim = subprocess.Popen(
            [sys.executable, "-m", "service"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    command = None
    try:
        for _ in range(1200):
            if "partitions assigned" in service_log.read_text():
                break
            assert victim.poll() is None, service_log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        with open(log_path, "w") as log:
            command = subprocess.Popen(sluice_command(*_label_args(rows, out)), env=env, stderr=log)
        await _wait_for_lines(out, KILL_AFTER, command, log_path)
        victim.kill()  # SIGKILL: its in-flight jobs are uncommitted and will be redone (maybe answered twice)
        victim.wait()
        assert _count_lines(out) < NUM_ROWS, "the run ended before the kill; the test proves nothing"
        async with run_service(service_config):  # the survivor takes over the jobs topic
            returncode = await asyncio.to_thread(command.wait, 300)
        assert returncode == 0, log_path.read_text()[-3000:]
        _assert_each_row_exactly_once(out, ids)
    finally:
        for process in (victim, command):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
