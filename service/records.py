"""The Kafka records around a job: the ref of the record it came in, and the records its outcome publishes.

A job's outcome publishes its result line (to the job's reply_to topic, else the results topic;
in the job's own content type) and, when the job failed, a dead letter: the job's own key and
bytes with its headers plus where it came from and why it failed. Every record fits in
`max_bytes`, counted as Kafka's record format frames it (record_size): a result that does not
becomes a `result_too_large` error result, and a dead letter that does not leaves out the job's
bytes, then its headers (`sluice-dropped` says what went). A dead letter copies at most
MAX_COPIED_HEADERS of the job's headers, MAX_COPIED_HEADER_BYTES in all.
"""

from __future__ import annotations

import dataclasses

from aiokafka.record.util import size_of_varint
from aiokafka.structs import ConsumerRecord

from schemas.codec import encode_result
from service.headers import excerpt, printable_key
from service.jobs import Outcome
from service.lenient_records import UndecodableBatch
from service.publisher import Headers
from service.transactions import OutRecord
from service.translate import to_error_line

MAX_JOB_AGE_MS = 7 * 24 * 3600 * 1000  # older timestamps are not believed (Kafka's default retention)
MAX_CLOCK_SKEW_MS = 60_000  # nor timestamps further ahead of this host's clock
_LOG_APPEND_TIME = 1
_BATCH_HEADER = 61  # a v2 record batch's header (one record per batch at worst)
_RECORD_FIXED = 1 + 10 + 5  # attributes, timestamp delta (varlong, at most 10), offset delta (varint)
MAX_COPIED_HEADERS = 64  # of a job's headers, onto its dead letter
MAX_COPIED_HEADER_BYTES = 16_384
_MAX_ERROR_MESSAGE = 1000  # characters of the error message in a dead letter's header


def job_timestamp_ms(record: ConsumerRecord, now_ms: int) -> int:
    """When the job was produced, for its queue time, latency metrics and span: the record's
    timestamp when it is plausible, else `now_ms` (when it was consumed). Producers set
    CreateTime as they like (negative, 1970, next year); a broker's LogAppendTime is trusted."""
    if record.timestamp_type == _LOG_APPEND_TIME:
        return record.timestamp
    if now_ms - MAX_JOB_AGE_MS <= record.timestamp <= now_ms + MAX_CLOCK_SKEW_MS:
        return record.timestamp
    return now_ms


def record_ref(record: ConsumerRecord) -> str:
    """ "topic/partition/offset": names the job in request ids and logs."""
    return f"{record.topic}/{record.partition}/{record.offset}"


def outcome_records(
    record: ConsumerRecord,
    outcome: Outcome,
    trace_headers: Headers,
    results_topic: str,
    dlq_topic: str,
    max_bytes: int,
    copy_job: bool = True,
) -> tuple[Outcome, list[OutRecord]]:
    """The outcome as published (a too large result replaced by its error) and its records: the
    result record (with `trace_headers`), then the dead letter if the job failed (without the
    job's key, value and headers unless `copy_job`)."""
    result = _result_record(outcome, trace_headers, results_topic)
    if (size := record_size(result)) > max_bytes:
        message = f"the result has {size} bytes; results may have at most {max_bytes}"
        outcome = error_outcome(outcome, "result_too_large", message)
        result = _result_record(outcome, trace_headers, results_topic)
    out = [result]
    if outcome.is_error:
        out.append(_dead_letter(record, outcome, dlq_topic, max_bytes, copy_job))
    return outcome, out


def error_outcome(outcome: Outcome, code: str, message: str) -> Outcome:
    """`outcome` turned into an error result for the results topic (its reply_to is dropped),
    with the custom_id cut short if even the error would be too large."""
    custom_id = outcome.result.custom_id
    if len(custom_id) > 1024:
        custom_id = f"{custom_id[:256]}... (custom_id cut from {len(custom_id)} characters)"
    result = to_error_line(custom_id, code, message)
    return dataclasses.replace(outcome, result=result, reply_to=None)


def record_size(record: OutRecord) -> int:
    """The bytes the record takes in a batch of its own, framed as Kafka's record format v2 does:
    a varint length before the key, the value and each header's key and value (an empty header
    costs 2 bytes: 500,000 of them are a megabyte), the header count, the record's own length."""
    body = _RECORD_FIXED + _field(record.key) + _field(record.value) + size_of_varint(len(record.headers))
    body += sum(_field(k.encode("utf-8", "surrogateescape")) + _field(v) for k, v in record.headers)
    return _BATCH_HEADER + size_of_varint(body) + body


def _field(data: bytes | None) -> int:
    return 1 if data is None else size_of_varint(len(data)) + len(data)


def _copied_headers(headers) -> tuple[Headers, int]:
    """The first of the job's headers, up to MAX_COPIED_HEADERS and MAX_COPIED_HEADER_BYTES,
    and how many were left out."""
    copied: Headers = []
    size = 0
    for key, value in headers:
        key = printable_key(key)
        size += len(key) + len(value or b"")
        if len(copied) == MAX_COPIED_HEADERS or size > MAX_COPIED_HEADER_BYTES:
            break
        copied.append((key, value))
    return copied, len(headers) - len(copied)


def undecodable_dead_letter(record: ConsumerRecord, failure: UndecodableBatch, dlq_topic: str) -> OutRecord:
    """The dead letter of a batch that could not be read: no key or value (there are none to
    copy), where it lies (`sluice-source-offsets`: first-last) and why."""
    reason: Headers = [
        ("sluice-error-code", b"undecodable_batch"),
        ("sluice-error-message", excerpt(failure.error, _MAX_ERROR_MESSAGE).encode()),
        ("sluice-source-topic", record.topic.encode()),
        ("sluice-source-partition", str(record.partition).encode()),
        ("sluice-source-offset", str(failure.first_offset).encode()),
        ("sluice-source-offsets", f"{failure.first_offset}-{failure.last_offset}".encode()),
    ]
    return OutRecord(dlq_topic, None, b"", reason)


def _result_record(outcome: Outcome, trace_headers: Headers, results_topic: str) -> OutRecord:
    headers: Headers = [("content-type", outcome.content_type.encode()), *trace_headers]
    value = encode_result(outcome.result, outcome.content_type)
    return OutRecord(outcome.reply_to or results_topic, outcome.result.custom_id.encode(), value, headers)


def _dead_letter(
    record: ConsumerRecord, outcome: Outcome, dlq_topic: str, max_bytes: int, copy_job: bool = True
) -> OutRecord:
    """The job's key, bytes and headers (a key that is not UTF-8 in `\\xff` escapes) plus where
    the record came from and why it failed; what does not fit in `max_bytes` is left out."""
    error = outcome.result.failure
    assert error is not None
    reason: Headers = [
        ("sluice-error-code", error.code.encode()),
        ("sluice-error-message", excerpt(error.message, _MAX_ERROR_MESSAGE).encode()),
        ("sluice-source-topic", record.topic.encode()),
        ("sluice-source-partition", str(record.partition).encode()),
        ("sluice-source-offset", str(record.offset).encode()),
    ]
    original, num_dropped = _copied_headers(record.headers or ())
    dropped = [f"{num_dropped} of the job's headers"] if num_dropped else []
    value_size = len(record.value or b"")
    letter = _letter(dlq_topic, record.key, record.value or b"", [*original, *reason], dropped)
    if not copy_job:  # the broker refused a record of this job before: nothing of the job goes
        dropped = ["value, key and headers (the broker refused a record of this job)"]
        return _letter(dlq_topic, None, b"", reason, dropped)
    if record_size(letter) > max_bytes:
        letter = _letter(
            dlq_topic, record.key, b"", [*original, *reason], [*dropped, f"value ({value_size} bytes)"]
        )
    if record_size(letter) > max_bytes:
        letter = _letter(dlq_topic, None, b"", reason, [f"value ({value_size} bytes), key and headers"])
    return letter


def _letter(topic: str, key: bytes | None, value: bytes, headers: Headers, dropped: list[str]) -> OutRecord:
    if dropped:
        headers = [*headers, ("sluice-dropped", "; ".join(dropped).encode())]
    return OutRecord(topic, key, value, headers)
