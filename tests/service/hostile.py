"""Records no well-behaved client writes: header keys that are not UTF-8, any timestamp.

aiokafka's producer encodes header keys from str, so it cannot write a bad one. post_raw()
builds the record batch with aiokafka's pure-Python builder, whose key encoding a `RawKey`
steers to the raw bytes, and sends the batch as it is; the broker stores what it gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy


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


async def post_raw(bootstrap: str, topic: str, partition: int, records: list[RawRecord]) -> None:
    """`records` as one batch in `topic`'s `partition`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        batch._builder = _DefaultRecordBatchBuilderPy(
            2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0, batch_size=2**24
        )
        for r in records:
            headers = [(RawKey(k), v) for k, v in r.headers]
            assert batch.append(timestamp=r.timestamp_ms, key=r.key, value=r.value, headers=headers)
        batch.close()
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
