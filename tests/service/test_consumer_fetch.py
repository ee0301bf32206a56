"""JobConsumer.fetch never raises: a failed fetch gives no records and is retried, and a batch with
a header key that is not UTF-8 still reads (no broker needed)."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords

from service.consumer import JobConsumer
from service.headers import undecodable_header_keys
from service.lenient_records import LenientMemoryRecords
from tests.service.hostile import RawKey


async def test_fetch_errors_give_no_records_and_the_next_fetch_retries(monkeypatch):
    consumer = JobConsumer("127.0.0.1:1", ["jobs"], "group", "sluice", commit_interval_ms=100)
    failures = [
        TopicAuthorizationFailedError("jobs"),
        KafkaConnectionError("broker gone"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ]

    async def getmany(timeout_ms, max_records):
        if failures:
            raise failures.pop(0)
        return {}

    monkeypatch.setattr(consumer._consumer, "getmany", getmany)
    for _ in range(4):
        assert await consumer.fetch(max_records=10, timeout_ms=10) == []
    assert not failures


@pytest.mark.parametrize("compression", [0, 1])  # none, gzip
def test_a_batch_with_a_header_key_that_is_not_utf8_reads_whole_with_the_key_surrogate_escaped(compression):
    builder = _DefaultRecordBatchBuilderPy(
        2,
        compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=0,
        batch_size=2**20,
    )
    for i in range(4):
        headers = [(RawKey(b"\xff\xfe"), b"v")] if i == 2 else [("ok", b"v")]
        builder.append(i, timestamp=1000 + i, key=b"k%d" % i, value=b"m%d" % i, headers=headers)
    data = bytes(builder.build())
    with pytest.raises(UnicodeDecodeError):  # what aiokafka's own parsing does with it
        list(MemoryRecords(data).next_batch())
    records = list(LenientMemoryRecords(data).next_batch())
    assert [(r.offset, r.key, r.value, r.timestamp) for r in records] == [
        (i, b"k%d" % i, b"m%d" % i, 1000 + i) for i in range(4)
    ]
    assert records[2].headers == [("\udcff\udcfe", b"v")]
    assert undecodable_header_keys(records[2].headers) == [b"\xff\xfe"]
