"""Record batches whose header keys are not UTF-8 must not stop a partition.

aiokafka decodes every record's header keys as UTF-8 while it iterates a fetched batch: one
bad key raises UnicodeDecodeError out of getmany() and loses the batch's other records with
it. Seeking past the record does not help, because the broker returns the whole batch again
and aiokafka decodes it from its start. So the consumers' fetcher reads batches through
LenientMemoryRecords: aiokafka's own (compiled) parsing first, and for a batch it cannot decode,
this module's parse of that batch, in which a bad key is decoded with `surrogateescape`.
Such a key holds lone surrogates, which no valid UTF-8 decodes to: the service turns its record
into an `invalid_encoding` error result and a dead letter (service/jobs.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import aiokafka.consumer.fetcher as _fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint

_LENGTH = struct.Struct(">i")  # a batch's length, after its 8-byte base offset
_LOG_OVERHEAD = 12  # base offset + length


def install() -> None:
    """Make aiokafka's fetcher (every consumer of this process) read batches leniently."""
    _fetcher.MemoryRecords = LenientMemoryRecords


class LenientMemoryRecords:
    """aiokafka's MemoryRecords, except that a batch with a non-UTF-8 header key still reads."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._records = MemoryRecords(data)
        self._pos = 0  # where the next batch starts in `data`

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self):
        batch = self._records.next_batch()
        if batch is None:
            return None
        (length,) = _LENGTH.unpack_from(self._data, self._pos + 8)
        raw = self._data[self._pos : self._pos + _LOG_OVERHEAD + length]
        self._pos += _LOG_OVERHEAD + length
        return _LenientBatch(batch, raw) if batch.magic >= 2 else batch


class _LenientBatch:
    """A v2 batch: aiokafka's parse, or ours from the first record aiokafka cannot decode."""

    def __init__(self, batch, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._num_read = 0  # records aiokafka's parse returned
        self._rest: Iterator[_DefaultRecordPy] | None = None

    def __getattr__(self, name: str):
        return getattr(self._batch, name)

    def __iter__(self) -> _LenientBatch:
        iter(self._batch)  # decompresses
        return self

    def __next__(self) -> _DefaultRecordPy:
        if self._rest is None:
            try:
                record = next(self._batch)
            except UnicodeDecodeError:
                self._rest = _read_records(self._raw, skip=self._num_read)
            else:
                self._num_read += 1
                return record
        return next(self._rest)


def _read_records(raw: memoryview, skip: int) -> Iterator[_DefaultRecordPy]:
    """The batch's records after the first `skip`, header keys decoded with surrogateescape."""
    batch = _DefaultRecordBatchPy(raw)
    batch._maybe_uncompress()
    buffer, pos = batch._buffer, batch._pos
    for index in range(batch._num_records):
        record, pos = _read_record(batch, buffer, pos)
        if index >= skip:
            yield record


def _read_record(batch: _DefaultRecordBatchPy, buffer: bytearray, pos: int) -> tuple[_DefaultRecordPy, int]:
    # Record => Length Attributes TimestampDelta OffsetDelta Key Value [HeaderKey HeaderValue]
    length, pos = decode_varint(buffer, pos)
    end = pos + length
    _, pos = decode_varint(buffer, pos)  # attributes: unused
    ts_delta, pos = decode_varint(buffer, pos)
    offset_delta, pos = decode_varint(buffer, pos)
    key, pos = _read_bytes(buffer, pos)
    value, pos = _read_bytes(buffer, pos)
    num_headers, pos = decode_varint(buffer, pos)
    headers = []
    for _ in range(max(0, num_headers)):
        h_key, pos = _read_bytes(buffer, pos)
        h_value, pos = _read_bytes(buffer, pos)
        headers.append(((h_key or b"").decode("utf-8", "surrogateescape"), h_value))
    if batch.timestamp_type == batch.LOG_APPEND_TIME:
        timestamp = batch.max_timestamp
    else:
        timestamp = batch.first_timestamp + ts_delta
    record = _DefaultRecordPy(
        batch.base_offset + offset_delta, timestamp, batch.timestamp_type, key, value, headers
    )
    return record, end


def _read_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    return bytes(buffer[pos : pos + size]), pos + size
