"""Records no well-behaved client writes: header keys that are not UTF-8, any timestamp, bombs.

aiokafka's producer encodes header keys from str, so it cannot write a bad one. post_raw()
builds the record batch with aiokafka's pure-Python builder, whose key encoding a `RawKey`
steers to the raw bytes, and sends the batch as it is; the broker stores what it gets.
gzip_bomb() writes a batch byte by byte: one record whose value is `size` zero bytes, gzipped
as it is written (the value is never in memory).
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy, _DefaultRecordBatchPy
from aiokafka.record.util import calc_crc32c, encode_varint
from aiokafka.structs import RecordMetadata


class RawKey(str):
    """A header key that encodes to exactly `raw` (the builder calls key.encode("utf-8"))."""

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *args, **kwargs) -> bytes:
        return self.raw


@dataclass
class RawRecord:
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # raw key bytes
    timestamp_ms: int | None = None  # None: now


async def post_raw(
    bootstrap: str, topic: str, partition: int, records: list[RawRecord], compression: int = 0
) -> RecordMetadata:
    """`records` as one batch in `topic`'s `partition`; `compression`: 0 none, 1 gzip, 2 snappy,
    3 lz4, 4 zstd. Returns where the broker put it (its first record's offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _DefaultRecordBatchBuilderPy(
            2,
            compression,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=0,
            batch_size=2**24,
        )
        for r in records:
            headers = [(RawKey(k), v) for k, v in r.headers]
            assert batch.append(timestamp=r.timestamp_ms, key=r.key, value=r.value, headers=headers)
        batch.close()
        return await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


def gzip_bomb(size: int) -> bytes:
    """A v2 batch of one gzip-compressed record with no key and `size` zero bytes as its value
    (a gigabyte compresses to about 1 MB)."""
    body_head = bytearray([0])  # attributes
    for n in (0, 0, -1, size):  # timestamp delta, offset delta, key length (null), value length
        encode_varint(n, body_head.append)
    body_tail = bytearray()
    encode_varint(0, body_tail.append)  # no headers
    length = bytearray()
    encode_varint(len(body_head) + size + len(body_tail), length.append)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(bytes(length + body_head))]
    chunk = bytes(1 << 20)
    for start in range(0, size, len(chunk)):
        parts.append(deflate.compress(chunk[: min(len(chunk), size - start)]))
    parts += [deflate.compress(bytes(body_tail)), deflate.flush()]
    records = b"".join(parts)
    now = int(time.time() * 1000)
    header = _DefaultRecordBatchPy.HEADER_STRUCT
    batch = bytearray(header.size) + records
    # base offset, length, leader epoch, magic, crc, attributes (gzip), last offset delta,
    # first and max timestamp, producer id and epoch, base sequence, record count
    header.pack_into(batch, 0, 0, len(batch) - 12, -1, 2, 0, 1, 0, now, now, -1, -1, -1, 1)
    crc_at = struct.calcsize(">qiib")
    struct.pack_into(">I", batch, crc_at, calc_crc32c(bytes(batch[crc_at + 4 :])))
    return bytes(batch)


class _BuiltBatch:
    """Stands in for aiokafka's batch builder: the batch is built already."""

    def __init__(self, data: bytes) -> None:
        self._data = bytearray(data)

    def build(self) -> bytearray:
        return self._data

    def size(self) -> int:
        return len(self._data)


async def post_batch(bootstrap: str, topic: str, partition: int, data: bytes) -> RecordMetadata:
    """A batch built byte by byte (gzip_bomb()), sent as it is; returns where the broker put it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=len(data) + 4096)
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _BuiltBatch(data)
        batch._relative_offset = 1  # its record count: aiokafka drops a batch it counts empty
        batch.close()
        return await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
