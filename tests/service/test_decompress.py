"""Fetched batches decompress within a bound, whatever their codec, and a batch that cannot be
read becomes one marker record instead of an exception (no broker needed)."""

from __future__ import annotations

import tracemalloc
import zlib

import cramjam
import pytest
from aiokafka.codec import snappy_encode
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from service.decompress import (
    CODEC_GZIP,
    CODEC_LZ4,
    CODEC_SNAPPY,
    CODEC_ZSTD,
    DecompressionRefused,
    decompress,
)
from service.lenient_records import LenientMemoryRecords, undecodable_batch
from tests.service.hostile import gzip_bomb

MIB = 1 << 20


def _gzip(data: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    return deflate.compress(data) + deflate.flush()


COMPRESS = {
    CODEC_GZIP: _gzip,
    CODEC_SNAPPY: snappy_encode,  # the xerial block framing Java clients write
    CODEC_LZ4: lambda d: bytes(cramjam.lz4.compress(d)),
    CODEC_ZSTD: lambda d: bytes(cramjam.zstd.compress(d)),
}


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_each_codec_decompresses_what_fits_the_limit(codec):
    data = b"a job line, " * 50_000
    assert bytes(decompress(codec, COMPRESS[codec](data), limit=len(data))) == data


def test_raw_snappy_as_librdkafka_writes_it_decompresses_too():
    data = b"x" * 100_000
    assert bytes(decompress(CODEC_SNAPPY, bytes(cramjam.snappy.compress_raw(data)), MIB)) == data


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_a_bomb_is_refused_without_holding_more_than_a_small_multiple_of_the_limit(codec):
    bomb = COMPRESS[codec](bytes(64 * MIB))  # kilobytes that expand to 64 MiB
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionRefused, match=r"decompresses to more than|output limited"):
            decompress(codec, bomb, limit=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MIB


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_garbage_is_refused_by_name(codec):
    with pytest.raises(DecompressionRefused):
        decompress(codec, b"\x82SNAPPY\x00" + b"not compressed at all" * 10, MIB)


def _batch(compression: int, num_records: int = 3) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(
        2,
        compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=0,
        batch_size=2**20,
    )
    for i in range(num_records):
        builder.append(i, timestamp=1000 + i, key=b"k%d" % i, value=b"job %d" % i, headers=[("h", b"v")])
    return bytes(builder.build())


@pytest.mark.parametrize("compression", [0, 1, 2, 3, 4])
def test_batches_of_every_codec_read_as_their_records(compression):
    (batch,) = _batches(_batch(compression))
    assert [(r.offset, r.key, r.value, r.headers) for r in batch] == [
        (i, b"k%d" % i, b"job %d" % i, [("h", b"v")]) for i in range(3)
    ]


def test_a_gzip_bomb_batch_reads_as_one_marker_at_its_last_offset_within_the_limit():
    data = gzip_bomb(256 * MIB)
    tracemalloc.start()
    try:
        (batch,) = _batches(data, max_batch_bytes=4 * MIB)
        (marker,) = list(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 4 * MIB + 3 * len(data)  # the output, its last growth step, the input
    assert marker.checksum.first_offset == marker.checksum.last_offset == marker.offset == 0
    assert "decompresses to more than 4194304 bytes" in marker.checksum.error


def test_a_batch_whose_crc_does_not_match_reads_as_a_marker_not_an_exception():
    data = bytearray(_batch(1, num_records=5))
    data[-3] ^= 0xFF  # inside the compressed records
    (batch,) = _batches(bytes(data))
    assert batch.validate_crc()  # aiokafka's own check must not raise out of getmany()
    (marker,) = list(batch)
    assert (marker.checksum.first_offset, marker.checksum.last_offset) == (0, 4)
    assert "CRC" in marker.checksum.error


def test_a_marker_is_told_apart_from_a_real_record():
    from aiokafka.structs import ConsumerRecord

    (batch,) = _batches(gzip_bomb(8 * MIB), max_batch_bytes=MIB)
    (marker,) = list(batch)
    as_consumed = ConsumerRecord("t", 0, marker.offset, 0, 0, None, None, marker.checksum, -1, -1, ())
    real = ConsumerRecord("t", 0, 0, 0, 0, None, b"v", None, -1, 1, ())
    assert undecodable_batch(as_consumed) is marker.checksum and undecodable_batch(real) is None


def _batches(data: bytes, max_batch_bytes: int = 16 * MIB) -> list:
    import service.lenient_records as lenient

    lenient.install(max_batch_bytes)
    try:
        records = LenientMemoryRecords(data)
        out = []
        while records.has_next():
            out.append(records.next_batch())
        return out
    finally:
        lenient.install()
