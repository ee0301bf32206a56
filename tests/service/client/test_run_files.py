"""The files of a `sluice label`/`sluice batch` run: inputs, templates, the output and the ledger.

No broker here: these pin down what resuming relies on (a torn last line is cut off, never
taken as a row) and how bad rows and bad templates are reported.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections import Counter

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.batch import BatchResponse, BatchResponseLine
from schemas.codec import decode_job, encode_job, encode_result
from schemas.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    SluiceExtension,
    TextCompletion,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from schemas.responses_api import (
    FunctionCallItem,
    InputTokensDetails,
    Logprob,
    LogprobAlternative,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseBody,
    ResponseUsage,
)
from service.client.driver import RunDriver, WorkItem
from service.client.inputs import InputError, check_unique_keys, read_batch_lines, read_rows
from service.client.ledger import LedgerError, RunLedger
from service.client.outputs import BatchOutput, LabelOutput, OutputError, label_record
from service.client.progress import RunProgress, summary
from service.client.results import read_result, token_logprobs
from service.client.templates import JobSpec, PromptTemplate, TemplateError
from service.translate import to_error_line


def test_jsonl_rows_keep_their_id_and_a_bad_line_becomes_an_error_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a", "text": "x"}\nnot json\n\n[1, 2]\n{"text": "no id"}\n')
    rows = list(read_rows(path, "jsonl", "id"))
    assert [(r.key, r.error is None) for r in rows] == [
        ("a", True),
        ("#1", False),
        ("#2", False),
        ("#3", False),
    ]
    assert "not a JSON line" in rows[1].error and "not a JSON object" in rows[2].error
    assert "no value in the id column 'id'" in rows[3].error


def test_without_an_id_column_the_row_number_is_the_id(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,extra\nhello,1\n"two\nlines",2\nshort\n')
    rows = list(read_rows(path, "csv", None))
    assert [r.row_id for r in rows] == [0, 1, 2]
    assert rows[1].fields == {"text": "two\nlines", "extra": "2"}
    assert rows[2].fields is None and "has 1 fields, the header has 2" in rows[2].error


def test_parquet_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [10, 11], "text": ["a", "b"]}), path)
    rows = list(read_rows(path, "parquet", "id"))
    assert [(r.key, r.fields["text"]) for r in rows] == [("10", "a"), ("11", "b")]


def test_a_file_that_is_not_parquet_is_an_input_error(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("id,text\n")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(read_rows(path, "parquet", None))


def test_duplicate_row_ids_are_refused_naming_the_id():
    with pytest.raises(InputError, match="row id 'b' appears twice \\(rows 1 and 2\\)"):
        check_unique_keys(iter(["a", "b", "b"]))


def test_batch_lines_keep_the_body_as_is_and_report_a_broken_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"custom_id": "q1", "url": "/v1/completions", "body": {"prompt": "x", "weird": [1.5]}}\n'
        '{"custom_id": "q2", "body": \n'
        '{"custom_id": "q3", "url": "/v1/completions"}\n'
    )
    lines = list(read_batch_lines(path))
    assert bytes(lines[0].job.body) == b'{"prompt": "x", "weird": [1.5]}'
    assert lines[1].custom_id == "line-1" and lines[1].error.code == "invalid_encoding"
    assert lines[2].custom_id == "q3" and (lines[2].error.code, lines[2].error.param) == (
        "invalid_request",
        "body",
    )


@pytest.mark.parametrize(
    "line",
    [
        b'{"custom_id": "m", "url": "/v1/moderations", "body": {"input": "hi"}}',
        b'{"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}',
        b'{"custom_id": "b", "url": "/v1/completions"}',
        b'{"custom_id": "j", "body": ',
    ],
    ids=["moderations", "method", "no-body", "not-json"],
)
def test_sluice_batch_writes_the_services_error_line_for_a_line_that_is_no_job(tmp_path, line):
    """Issue 30, defect 2: the client coded every envelope failure as invalid_request, param null."""
    from schemas.codec import JobDecodeError, decode_job
    from service.client.batch import _failure_record
    from service.jobs import _error_line

    path = tmp_path / "in.jsonl"
    path.write_bytes(line + b"\n")
    (read,) = read_batch_lines(path)
    ours = _failure_record(read.custom_id, None, read.error.code, read.error.message, read.error.param)
    with pytest.raises(JobDecodeError) as service_error:
        decode_job(line)
    theirs = _error_line(read.custom_id, "ref", service_error.value)

    def comparable(result):
        encoded = msgspec.to_builtins(result)
        encoded.pop("id")
        (encoded.get("response") or {}).pop("request_id", None)
        return encoded

    assert comparable(ours) == comparable(theirs)
    if b"moderations" in line:
        assert (ours.response.body.error.code, ours.response.body.error.param) == (
            "unsupported_endpoint",
            "url",
        )


def test_format_and_jinja_templates_render_row_fields():
    assert PromptTemplate("Review: {text}").render({"text": "good"}) == "Review: good"
    jinja = PromptTemplate("{% if stars %}{{ stars }} stars: {% endif %}{{ text | upper }}")
    assert jinja.kind == "jinja" and jinja.render({"text": "ok", "stars": 4}) == "4 stars: OK"


@pytest.mark.parametrize("text", ["Review: {text} {missing}", "Review: {{ text }} {{ missing }}"])
def test_a_field_the_row_lacks_is_an_error_not_an_empty_string(text):
    with pytest.raises(TemplateError, match="missing"):
        PromptTemplate(text).render({"text": "x"})


def test_a_template_that_does_not_parse_is_refused_at_once():
    with pytest.raises(TemplateError, match="does not parse"):
        PromptTemplate("{{ text ")


def test_choices_go_as_vllm_structured_outputs():
    spec = JobSpec(model="m", max_tokens=4, choices=["yes", "no"], chat=True, system="Be brief.")
    job = decode_job(encode_job(spec.job("r/1", "Q")))  # what the service reads
    assert (job.custom_id, job.url) == ("r/1", "/v1/chat/completions")
    assert job.body.structured_outputs.choice == ["yes", "no"]
    assert (job.body.messages[0].role, job.body.messages[0].content) == ("system", "Be brief.")
    assert job.body.temperature == 0.0


def _ok(text, probabilities=None, tokens=2, custom_id="x", logprobs=None) -> BatchResponseLine:
    sluice = SluiceExtension(schema_version=1, queue_ms=1.0, total_ms=2.0, choice_probabilities=probabilities)
    choice = CompletionChoice(text=text, finish_reason="stop", logprobs=logprobs)
    usage = Usage(prompt_tokens=3, completion_tokens=tokens, total_tokens=3 + tokens)
    body = TextCompletion(id="cmpl-1", created=0, model="m", choices=[choice], usage=usage, sluice=sluice)
    return _result(body, custom_id)


def _result(body, custom_id="x") -> BatchResponseLine:
    response = BatchResponse(status_code=200, request_id="req-1", body=body)
    return BatchResponseLine(id="batch_req_1", custom_id=custom_id, response=response)


def test_a_result_gives_label_probabilities_and_tokens_and_an_error_result_its_code():
    info = read_result(_ok("yes", {"yes": 0.75, "no": 0.25}))
    assert (info.text, info.probabilities, info.completion_tokens) == ("yes", {"yes": 0.75, "no": 0.25}, 2)
    assert read_result(_ok("yes")).probabilities is None
    failed = to_error_line("x", "invalid_prompt", "too long")
    assert label_record(7, failed) == {
        "row_id": 7,
        "label": None,
        "probabilities": None,
        "error": "invalid_prompt: too long",
    }


def test_token_logprobs_read_the_same_from_both_endpoints_shapes():
    top = [TopLogprob(token="a", logprob=-0.1)]
    chat_logprobs = ChatLogprobs(content=[TokenLogprob(token="a", logprob=-0.1, top_logprobs=top)])
    chat_choice = ChatChoice(
        message=AssistantMessage(content="a"), finish_reason="stop", logprobs=chat_logprobs
    )
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    chat = _result(ChatCompletion(id="chat-1", created=0, model="m", choices=[chat_choice], usage=usage))
    completion = _ok(
        "a", logprobs=CompletionLogprobs(tokens=["a"], token_logprobs=[-0.1], top_logprobs=[{"a": -0.1}])
    )
    expected = [{"token": "a", "logprob": -0.1, "top": [["a", -0.1]]}]
    response = _response_result(
        [Logprob(token="a", bytes=[97], logprob=-0.1, top_logprobs=[_alt("a", -0.1)])]
    )
    for result in (chat, completion, response):
        assert token_logprobs(result) == expected
    assert token_logprobs(_ok("x")) is None
    assert token_logprobs(to_error_line("x", "invalid_prompt", "too long")) is None


def _alt(token: str, logprob: float) -> LogprobAlternative:
    return LogprobAlternative(token=token, bytes=list(token.encode()), logprob=logprob)


def _response_result(logprobs=()) -> BatchResponseLine:
    message = OutputMessage(
        id="msg_1", status="completed", content=[OutputText(text="a", logprobs=list(logprobs))]
    )
    usage = ResponseUsage(
        input_tokens=1,
        input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=1),
        output_tokens=3,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=4,
    )
    call = FunctionCallItem(id="fc_1", call_id="call_1", name="f", arguments="{}")
    return _result(
        ResponseBody(
            id="resp_1", created_at=0, status="completed", model="m", output=[message, call], usage=usage
        )
    )


def test_a_responses_result_gives_its_messages_text_and_its_output_tokens():
    info = read_result(_response_result())
    assert (info.text, info.probabilities, info.error, info.completion_tokens) == ("a", None, None, 3)
    assert token_logprobs(_response_result()) is None


def test_a_completions_sampled_token_is_kept_as_an_alternative_only_when_among_the_best():
    """Completions' top_logprobs hold the sampled token too (up to N + 1 entries); a record keeps
    the N best, best first, as chat's alternatives are."""
    outside = CompletionLogprobs(
        tokens=["c"], token_logprobs=[-3.0], top_logprobs=[{"c": -3.0, "a": -0.1, "b": -1.0}]
    )
    among = CompletionLogprobs(tokens=["b"], token_logprobs=[-1.0], top_logprobs=[{"b": -1.0, "a": -0.1}])
    assert token_logprobs(_ok("c", logprobs=outside), 2)[0]["top"] == [["a", -0.1], ["b", -1.0]]
    assert token_logprobs(_ok("b", logprobs=among), 2)[0]["top"] == [["a", -0.1], ["b", -1.0]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_output_reloads_done_rows_and_cuts_a_torn_last_line(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    out = LabelOutput(path, fmt)
    out.add([label_record(0, _ok("yes", {"yes": 0.9, "no": 0.1})), label_record(1, _ok("multi\nline"))])
    out.close()
    intact = path.read_bytes()
    torn = b'{"row_id": 2, "lab' if fmt == "jsonl" else b'2,"torn\ninside quotes'
    path.write_bytes(intact + torn)
    again = LabelOutput(path, fmt)
    assert again.done == {"0", "1"} and again.labels == {"yes": 1, "multi\nline": 1}
    assert path.read_bytes() == intact  # the torn record is gone, so the row is simply done again
    again.add([label_record(2, _ok("no"))])
    again.close()
    assert LabelOutput(path, fmt).done == {"0", "1", "2"}


def test_csv_output_has_a_header_and_probabilities_as_json(tmp_path):
    path = tmp_path / "out.csv"
    out = LabelOutput(path, "csv")
    out.add([label_record("r1", _ok("yes", {"yes": 0.5, "no": 0.5}))])
    out.close()
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"row_id": "r1", "label": "yes", "probabilities": '{"yes":0.5,"no":0.5}', "error": ""}]


def test_a_csv_output_with_other_columns_is_not_taken_over(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(OutputError, match="its columns are"):
        LabelOutput(path, "csv")


def test_retrying_errors_removes_only_the_failed_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    out = BatchOutput(path)
    out.add([_ok("a", custom_id="a"), to_error_line("b", "engine_error", "boom", 500)])
    assert out.errors == {"b": "engine_error: boom"}
    assert out.drop_failed() == {"b"}
    assert BatchOutput(path).done == {"a"} and not BatchOutput(path).errors


def test_ledger_keeps_the_run_id_counts_posts_and_drops_a_torn_record(tmp_path):
    path = tmp_path / "out.jsonl.run"
    ledger = RunLedger.open(path, "label", None)
    assert ledger.custom_id("7", 1) == f"{ledger.run_id}/7"
    assert ledger.custom_id("7", 2) == f"{ledger.run_id}~2/7"  # a retry's answer is told apart
    ledger.record_posted([("7", 1), ("8", 1), ("8", 1)])  # posted twice after a kill: still attempt 1
    ledger.close()
    path.write_bytes(path.read_bytes() + b'["9", ')
    again = RunLedger.open(path, "label", None)
    assert again.run_id == ledger.run_id and dict(again.attempts) == {"7": 1, "8": 1}
    with pytest.raises(LedgerError, match="leave out --run-id to resume it"):
        RunLedger.open(path, "label", "another-run")
    with pytest.raises(LedgerError, match="letters, digits"):
        RunLedger.open(tmp_path / "new.run", "label", "bad/id")


def test_ledger_remembers_the_topics_the_run_created_and_only_those(tmp_path):
    path = tmp_path / "out.jsonl.run"
    ledger = RunLedger.open(path, "batch", None)
    ledger.record_created_topics([])  # the reply topic existed already: nothing to delete later
    ledger.record_posted([("a", 1)])
    ledger.close()
    assert RunLedger.open(path, "batch", None).created_topics == []
    resumed = RunLedger.open(path, "batch", None)
    resumed.record_created_topics(["results.batch-1"])
    resumed.close()
    again = RunLedger.open(path, "batch", None)
    assert again.created_topics == ["results.batch-1"] and dict(again.attempts) == {"a": 1}


class _TwiceAnsweringBackend:
    """A double of the Kafka backend that answers every job twice, plus a stale answer from an earlier attempt."""

    def __init__(self, stale: list[str]) -> None:
        self.posted: list[str] = []
        self._answers: list[tuple[str, bytes]] = [(custom_id, b"{}") for custom_id in stale]

    async def submit(self, jobs):
        for custom_id, job in jobs:
            self.posted.append(custom_id)
            text = decode_job(job).body.prompt.upper()
            answer = encode_result(_ok(text, custom_id=custom_id))
            self._answers += [(custom_id, answer), (custom_id, answer)]

    async def results(self):
        while True:
            batch, self._answers = self._answers, []
            yield batch
            await asyncio.sleep(0.01)


async def test_answers_that_arrive_twice_or_answer_a_superseded_job_are_not_written(tmp_path):
    out = LabelOutput(tmp_path / "out.jsonl", "jsonl")
    ledger = RunLedger.open(tmp_path / "out.jsonl.run", "label", "run1")
    ledger.record_posted([("0", 1)])  # row 0 was posted before, failed, and is retried now
    spec = JobSpec(model="m", max_tokens=2)
    items = [WorkItem(str(i), i, spec.job("", f"row {i}")) for i in range(3)]
    backend = _TwiceAnsweringBackend(stale=["run1/0"])  # the answer to row 0's first job comes late
    driver = RunDriver(
        out, ledger, backend, lambda key, row_id, r: label_record(row_id, r),
        lambda key, row_id, code, message: {"row_id": row_id, "error": f"{code}: {message}"},
        RunProgress(3, 0, 0, enabled=False), idle_timeout=5,
    )  # fmt: skip
    stats = await driver.run(items, waiting=set())
    out.close()
    assert backend.posted == ["run1~2/0", "run1/1", "run1/2"]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted((line["row_id"], line["label"]) for line in lines) == [
        (0, "ROW 0"),
        (1, "ROW 1"),
        (2, "ROW 2"),
    ]
    assert stats.is_complete and stats.written == 3


def test_the_summary_names_the_distribution_the_failures_and_the_unanswered_rows():
    text = summary(
        total=5, done=4, labels=Counter({"yes": 3, "no": 1}), errors={"r9": "invalid_row: row 9: bad"},
        written=4, output_tokens=8, seconds=2.0, pending=["r5"], idle_timeout=30,
    )  # fmt: skip
    assert "rows: 4 of 5 written (4 by this run), 1 failed" in text
    assert "throughput: 2.0 rows/s, 4.0 output tokens/s" in text
    assert "'yes' 3 (75.0%), 'no' 1 (25.0%)" in text
    assert "r9: invalid_row: row 9: bad" in text and "--retry-errors" in text
    assert "unanswered: 1 rows" in text and "r5" in text
