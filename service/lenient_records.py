"""Record batches that aiokafka cannot read must not stop a partition, nor cost unbounded memory.

aiokafka's fetcher turns a fetched batch into records while getmany() iterates it, and an error
there (a header key that is not UTF-8, a codec it lacks, a corrupt batch) raises out of
getmany(): the batch is fetched again, and fails again, for good; the records of the same fetch
read before it are lost with the exception. aiokafka also decompresses a whole batch before it
reads the first record, so a 1 MB gzip batch that expands to 1 GB costs 1 GB.

So the consumers' fetcher reads batches through LenientMemoryRecords, which reads each batch
whole before handing out its first record:
- uncompressed: aiokafka's own (compiled) parsing; for a batch it cannot decode, this module's
  parse, in which a header key that is not UTF-8 is decoded with `surrogateescape` (lone
  surrogates, which no valid UTF-8 decodes to: the service answers such a record with an
  `invalid_encoding` error result and a dead letter);
- compressed: decompressed here, never past `max_batch_bytes` (service/decompress.py), then
  this module's parse;
- a batch that still cannot be read (a failed CRC, a corrupt or oversized compressed batch)
  reads as one marker record at the batch's last offset, whose `checksum` is an
  UndecodableBatch: the consumer retries it a few times, then dead-letters it and goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import aiokafka.consumer.fetcher as _fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy, _DefaultRecordPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint
from aiokafka.structs import ConsumerRecord

from service.decompress import CODEC_NAMES, CODEC_NONE, decompress

_LENGTH = struct.Struct(">i")  # a batch's length, after its 8-byte base offset
_LOG_OVERHEAD = 12  # base offset + length
_HEADER_SIZE = _DefaultRecordBatchPy.HEADER_STRUCT.size  # a v2 batch's header, before its records
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024

_max_batch_bytes = DEFAULT_MAX_BATCH_BYTES  # what one batch may decompress to (install())


@dataclass(frozen=True, slots=True)
class UndecodableBatch:
    """A fetched batch that could not be read: its offsets and why."""

    first_offset: int
    last_offset: int
    error: str


def install(max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> None:
    """Make aiokafka's fetcher (every consumer of this process) read batches as this module does."""
    global _max_batch_bytes
    _max_batch_bytes = max_batch_bytes
    _fetcher.MemoryRecords = LenientMemoryRecords


def undecodable_batch(record: ConsumerRecord) -> UndecodableBatch | None:
    """The batch failure a marker record stands for; None for a real record."""
    return record.checksum if isinstance(record.checksum, UndecodableBatch) else None


class LenientMemoryRecords:
    """aiokafka's MemoryRecords, except that every v2 batch reads (as records or as a marker)."""

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
        if batch.magic < 2 or batch.is_control_batch:  # transaction markers: aiokafka reads them
            return batch
        return _CheckedBatch(batch, raw, _max_batch_bytes)


class _CheckedBatch:
    """A v2 data batch, read whole when it is first iterated: its records, or one marker."""

    def __init__(self, batch, raw: memoryview, max_bytes: int) -> None:
        self._batch = batch
        self._raw = raw
        self._max_bytes = max_bytes

    def __getattr__(self, name: str):
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        return True  # checked in __iter__: a failed CRC becomes a marker, not an exception

    def __iter__(self):
        try:
            records = self._read()
        except Exception as e:  # whatever the bytes are, the partition goes on
            records = [_MarkerRecord(self._batch, f"{type(e).__name__}: {e}")]
        return iter(records)

    def _read(self) -> list:
        batch = self._batch
        if not batch.validate_crc():
            return [_MarkerRecord(batch, "the batch's CRC does not match its contents")]
        codec = batch.attributes & 0x07
        if codec == CODEC_NONE:
            try:
                return list(batch)
            except UnicodeDecodeError:  # a header key that is not UTF-8
                return _read_records(batch, self._raw, bytes(self._raw[_HEADER_SIZE:]))
        records = self._raw[_HEADER_SIZE:]
        try:
            buffer = decompress(codec, records, self._max_bytes)
        except ValueError as e:
            name = CODEC_NAMES.get(codec, f"codec {codec}")
            return [_MarkerRecord(batch, f"{name} batch of {len(records)} bytes: {e}")]
        return _read_records(batch, self._raw, buffer)


class _MarkerRecord:
    """What aiokafka's fetcher reads of a record; `checksum` (None for v2 records) says what failed."""

    __slots__ = ("checksum", "headers", "key", "offset", "timestamp", "timestamp_type", "value")

    def __init__(self, batch, error: str) -> None:
        # At the batch's last offset: the fetcher passes it even when it fetched from inside the
        # batch, and once it is done the committed offset moves past the whole batch.
        self.offset = batch.base_offset + batch.last_offset_delta
        self.timestamp, self.timestamp_type = batch.max_timestamp, batch.timestamp_type
        self.key = self.value = None
        self.headers: list = []
        self.checksum = UndecodableBatch(batch.base_offset, self.offset, error)


def _read_records(batch, raw: memoryview, buffer) -> list[_DefaultRecordPy]:
    """The records of a batch's (decompressed) record data, header keys with surrogateescape."""
    num_records = _DefaultRecordBatchPy.HEADER_STRUCT.unpack_from(raw)[12]
    records, pos = [], 0
    for _ in range(num_records):
        record, pos = _read_record(batch, buffer, pos)
        records.append(record)
    return records


def _read_record(batch, buffer, pos: int) -> tuple[_DefaultRecordPy, int]:
    # Record => Length Attributes TimestampDelta OffsetDelta Key Value [HeaderKey HeaderValue]
    length, pos = decode_varint(buffer, pos)
    end = pos + length
    if length <= 0 or end > len(buffer):
        raise ValueError(f"a record of {length} bytes does not fit its batch")
    _, pos = decode_varint(buffer, pos)  # attributes: unused
    ts_delta, pos = decode_varint(buffer, pos)
    offset_delta, pos = decode_varint(buffer, pos)
    key, pos = _read_bytes(buffer, pos, end)
    value, pos = _read_bytes(buffer, pos, end)
    num_headers, pos = decode_varint(buffer, pos)
    headers = []
    for _ in range(max(0, num_headers)):
        h_key, pos = _read_bytes(buffer, pos, end)
        h_value, pos = _read_bytes(buffer, pos, end)
        headers.append(((h_key or b"").decode("utf-8", "surrogateescape"), h_value))
    if pos != end:
        raise ValueError("a record's fields do not add up to its length")
    log_append_time = batch.timestamp_type == 1
    timestamp = batch.max_timestamp if log_append_time else batch.first_timestamp + ts_delta
    record = _DefaultRecordPy(
        batch.base_offset + offset_delta, timestamp, batch.timestamp_type, key, value, headers
    )
    return record, end


def _read_bytes(buffer, pos: int, end: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > end:
        raise ValueError(f"a field of {size} bytes runs past its record")
    return bytes(buffer[pos : pos + size]), pos + size
