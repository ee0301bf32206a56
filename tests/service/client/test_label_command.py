"""`sluice label` and `sluice batch` against the real broker and a running service (and --local)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.client.label_helpers import run_sluice, sluice_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by(records: list[dict], key: str) -> dict:
    ids = [r[key] for r in records]
    assert len(ids) == len(set(ids)), f"a {key} appears twice"
    return {r[key]: r for r in records}


async def test_csv_rows_get_one_line_each_and_a_malformed_row_an_error_line(
    service_config, run_service, tmp_path
):
    rows = tmp_path / "reviews.csv"
    rows.write_text('id,text\nr1,great food\nr2,"slow, cold"\nr3\nr4,fine\n')  # r3 lacks a field
    out = tmp_path / "labels.csv"
    args = ["label", str(rows), "--template", "Review: {text}\nSentiment:", "--id-column", "id"]
    args += ["--choices", "positive,negative", "--max-tokens", "3", "--output", str(out), "--no-progress"]
    args += ["--save-logprobs", "2"]
    async with run_service(service_config):
        done = await run_sluice(*args, env=sluice_env(service_config))
    assert done.returncode == 0, done.stderr
    lines = _by(list(__import__("csv").DictReader(out.open())), "row_id")
    assert set(lines) == {"r1", "r2", "#2", "r4"}  # the unreadable row is named by its position
    assert lines["#2"]["error"].startswith("invalid_row: row 2: has 1 fields")
    assert all(
        lines[r]["label"] in ("positive", "negative") and not lines[r]["error"] for r in ("r1", "r2", "r4")
    )
    for r in ("r1", "r2", "r4"):  # every generated token with its 2 best alternatives
        tokens = json.loads(lines[r]["logprobs"])
        # A choice is always whole: the engine raises max_tokens to the longest choice's length.
        assert "".join(t["token"] for t in tokens) == lines[r]["label"]
        assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in tokens)
    assert lines["#2"]["logprobs"] == ""
    assert "rows: 4 of 4 written (4 by this run), 1 failed" in done.stderr
    assert "#2: invalid_row" in done.stderr and "--retry-errors" in done.stderr
    assert not out.with_name("labels.csv.run").exists()  # complete: the output alone records the run


async def test_parquet_chat_run_through_kafka_equals_the_local_run(service_config, run_service, tmp_path):
    rows = tmp_path / "questions.parquet"
    pq.write_table(pa.table({"qid": [101, 102, 103], "q": ["Is water wet?", "Name a colour.", "Hi?"]}), rows)
    common = ["label", str(rows), "--template", "Answer briefly: {{ q }}", "--chat", "--id-column", "qid"]
    common += ["--max-tokens", "4", "--no-progress"]
    env = sluice_env(service_config)
    async with run_service(service_config):
        through_kafka = await run_sluice(*common, "--output", str(tmp_path / "kafka.jsonl"), env=env)
    assert through_kafka.returncode == 0, through_kafka.stderr
    local = await run_sluice(*common, "--local", "--output", str(tmp_path / "local.jsonl"), env=env)
    assert local.returncode == 0, local.stderr
    kafka_lines = _by(_jsonl(tmp_path / "kafka.jsonl"), "row_id")
    assert set(kafka_lines) == {101, 102, 103}
    assert kafka_lines == _by(_jsonl(tmp_path / "local.jsonl"), "row_id")  # greedy: the same labels


async def test_rows_posted_before_the_command_stopped_are_awaited_not_posted_again(
    service_config, run_service, kafka, tmp_path
):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(12)))
    out = tmp_path / "out.jsonl"
    args = ["label", str(rows), "--template", "{text}", "--max-tokens", "2", "--output", str(out)]
    args += ["--no-progress", "--idle-timeout", "3"]
    env = sluice_env(service_config)
    no_service = await run_sluice(*args, env=env)  # nothing answers: it gives up, the jobs stay queued
    assert no_service.returncode == 1, no_service.stderr
    assert "unanswered: 12 rows" in no_service.stderr and out.with_name("out.jsonl.run").exists()
    async with run_service(service_config):
        resumed = await run_sluice(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["row_id"] for r in _jsonl(out)) == list(range(12))
    assert len(await kafka.read_all(service_config.jobs_topics[0])) == 12  # each job posted once


async def test_batch_file_round_trip_with_invalid_lines_through_kafka_and_local(
    service_config, run_service, tmp_path
):
    batch = tmp_path / "batch.jsonl"
    jobs = [
        {
            "custom_id": "c1",
            "url": "/v1/completions",
            "body": {"prompt": "Hello", "max_tokens": 3, "temperature": 0},
        },
        {
            "custom_id": "c2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
        },
        {"custom_id": "c3", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 7}},
    ]
    batch.write_text("".join(json.dumps(j) + "\n" for j in jobs) + '{"custom_id": "c4", "url": \n')
    env = sluice_env(service_config)
    async with run_service(service_config):
        done = await run_sluice("batch", str(batch), str(tmp_path / "out.jsonl"), "--no-progress", env=env)
        assert done.returncode == 0, done.stderr
        written = (tmp_path / "out.jsonl").read_bytes()
        again = await run_sluice("batch", str(batch), str(tmp_path / "out.jsonl"), "--no-progress", env=env)
    assert again.returncode == 0 and (tmp_path / "out.jsonl").read_bytes() == written  # nothing twice
    lines = _by(_jsonl(tmp_path / "out.jsonl"), "custom_id")
    assert set(lines) == {"c1", "c2", "c3", "line-3"}
    assert lines["c1"]["response"]["body"]["object"] == "text_completion" and lines["c1"]["error"] is None
    assert lines["c2"]["response"]["body"]["object"] == "chat.completion"
    c3_error = lines["c3"]["response"]["body"]["error"]  # an HTTP error: in the response, as OpenAI's
    assert lines["c3"]["error"] is None and lines["c3"]["response"]["status_code"] == 400
    assert c3_error["code"] == "invalid_request" and "temperature" in c3_error["message"]
    # bytes that are no JSON: what the service writes for them on the jobs topic, a failure line
    assert lines["line-3"]["response"] is None and lines["line-3"]["error"]["code"] == "invalid_encoding"

    local = await run_sluice(
        "batch", str(batch), str(tmp_path / "local.jsonl"), "--local", "--no-progress", env=env
    )
    assert local.returncode == 0, local.stderr
    local_lines = _by(_jsonl(tmp_path / "local.jsonl"), "custom_id")
    assert local_lines["c1"]["response"]["body"]["choices"] == lines["c1"]["response"]["body"]["choices"]
    assert local_lines["c2"]["response"]["body"]["choices"] == lines["c2"]["response"]["body"]["choices"]
    assert local_lines["c3"]["response"]["body"] == lines["c3"]["response"]["body"]


async def test_greedy_choice_labels_are_the_choice_their_probabilities_name_and_sum_to_one(
    service_config, tmp_path
):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["good", "bad", "meh", "superb"]))
    out = tmp_path / "out.jsonl"
    args = [
        "label",
        str(rows),
        "--template",
        "Review: {text}. Sentiment:",
        "--choices",
        "positive,negative,neutral",
    ]
    done = await run_sluice(
        *args, "--local", "--output", str(out), "--no-progress", env=sluice_env(service_config)
    )
    assert done.returncode == 0, done.stderr
    for line in _jsonl(out):
        assert line["label"] in {"positive", "negative", "neutral"}, line
        assert set(line["probabilities"]) == {"positive", "negative", "neutral"}
        assert math.isclose(sum(line["probabilities"].values()), 1.0, abs_tol=1e-4)
        # the README's example once labelled every row `positive` while `neutral` had 0.998
        assert line["label"] == max(line["probabilities"], key=line["probabilities"].get), line
