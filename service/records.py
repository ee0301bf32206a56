"""The Kafka records around a job: the ref of the record it came in, and the records its outcome publishes.

A job's outcome publishes its result line (to the job's reply_to topic, else the results topic;
in the job's own content type) and, when the job failed, a dead letter: the job's own key and
bytes with its headers plus where it came from and why it failed.
"""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from schemas.codec import encode_result
from service.jobs import Outcome, printable_key
from service.publisher import Headers
from service.transactions import OutRecord


def record_ref(record: ConsumerRecord) -> str:
    """ "topic/partition/offset": names the job in request ids and logs."""
    return f"{record.topic}/{record.partition}/{record.offset}"


def outcome_records(
    record: ConsumerRecord, outcome: Outcome, trace_headers: Headers, results_topic: str, dlq_topic: str
) -> list[OutRecord]:
    """The result record (with `trace_headers`), then the dead letter if the job failed."""
    headers: Headers = [("content-type", outcome.content_type.encode()), *trace_headers]
    value = encode_result(outcome.result, outcome.content_type)
    out = [OutRecord(outcome.reply_to or results_topic, outcome.result.custom_id.encode(), value, headers)]
    if outcome.is_error:
        out.append(
            OutRecord(dlq_topic, record.key, record.value or b"", _dead_letter_headers(record, outcome))
        )
    return out


def _dead_letter_headers(record: ConsumerRecord, outcome: Outcome) -> Headers:
    """The original headers (a key that is not UTF-8 in `\\xff` escapes) plus where the record
    came from and why it failed."""
    error = outcome.result.error
    assert error is not None
    return [
        *((printable_key(key), value) for key, value in record.headers or ()),
        ("sluice-error-code", error.code.encode()),
        ("sluice-error-message", error.message.encode()),
        ("sluice-source-topic", record.topic.encode()),
        ("sluice-source-partition", str(record.partition).encode()),
        ("sluice-source-offset", str(record.offset).encode()),
    ]
