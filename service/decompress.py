"""Bounded decompression of Kafka record batches: never more than `limit` bytes, whatever the input.

aiokafka decompresses a whole batch into memory before it reads the first record, so a 1 MB
gzip batch that expands to 1 GB costs 1 GB (twice, with its copies). Here every codec stops at
`limit` bytes of output: gzip streams with a bound on each step's output; snappy's blocks
declare their length, which is checked before a block is decompressed; lz4 and zstd decompress
into a buffer that grows (by re-running) up to `limit + 1` bytes and no further.
"""

from __future__ import annotations

import struct
import zlib

import cramjam

CODEC_NONE, CODEC_GZIP, CODEC_SNAPPY, CODEC_LZ4, CODEC_ZSTD = range(5)
CODEC_NAMES = {CODEC_GZIP: "gzip", CODEC_SNAPPY: "snappy", CODEC_LZ4: "lz4", CODEC_ZSTD: "zstd"}

_XERIAL_HEADER = b"\x82SNAPPY\x00"  # snappy-java's block framing (Java clients), then version, compat
_FIRST_BUFFER = 1 << 16
_GZIP_STEP = 1 << 20  # output bytes per inflate step


class DecompressionRefused(ValueError):
    """The data does not decompress, or decompresses to more than the limit."""


def decompress(codec: int, data: memoryview | bytes, limit: int) -> bytes | bytearray | memoryview:
    """`data` decompressed with the batch's `codec` (its attributes' low 3 bits); at most `limit` bytes."""
    if codec == CODEC_GZIP:
        return _gzip(data, limit)
    if codec == CODEC_SNAPPY:
        return _snappy(bytes(data), limit)
    if codec == CODEC_LZ4:
        return _into(cramjam.lz4.decompress_into, "lz4", bytes(data), limit)
    if codec == CODEC_ZSTD:
        return _into(cramjam.zstd.decompress_into, "zstd", bytes(data), limit)
    raise DecompressionRefused(f"unknown compression codec {codec}")


def _gzip(data, limit: int) -> bytearray:
    out = bytearray()
    rest = bytes(data)
    while rest:  # one gzip member after another (a concatenation is valid gzip)
        inflater = zlib.decompressobj(wbits=31)
        pending = rest
        while pending and not inflater.eof:
            try:
                out += inflater.decompress(pending, min(_GZIP_STEP, limit + 1 - len(out)))
            except zlib.error as e:
                raise DecompressionRefused(f"gzip: {e}") from None
            _check_size(len(out), limit, "gzip")
            pending = inflater.unconsumed_tail
        if not inflater.eof:
            raise DecompressionRefused("gzip: the data ends inside a compressed stream")
        rest = inflater.unused_data
    return out


def _snappy(data: bytes, limit: int) -> bytes | bytearray:
    if not data.startswith(_XERIAL_HEADER):
        return _snappy_block(data, limit)
    out = bytearray()
    pos = 16  # header, version, compat
    while pos < len(data):
        if pos + 4 > len(data):
            raise DecompressionRefused("snappy: a block's length is cut short")
        (length,) = struct.unpack_from(">i", data, pos)
        if length < 0 or pos + 4 + length > len(data):
            raise DecompressionRefused(f"snappy: a block of {length} bytes does not fit the batch")
        out += _snappy_block(data[pos + 4 : pos + 4 + length], limit - len(out))
        pos += 4 + length
    return out


def _snappy_block(block: bytes, limit: int) -> bytearray:
    try:
        size = cramjam.snappy.decompress_raw_len(block)
    except cramjam.DecompressionError as e:
        raise DecompressionRefused(f"snappy: {e}") from None
    _check_size(size, limit, "snappy")
    out = bytearray(size)
    try:
        cramjam.snappy.decompress_raw_into(block, out)
    except cramjam.DecompressionError as e:
        raise DecompressionRefused(f"snappy: {e}") from None
    return out


def _into(decompress_into, name: str, data: bytes, limit: int) -> memoryview:
    """Decompress into a buffer of growing size: a larger output than the buffer is an error
    (cramjam writes no further), so the buffer never exceeds `limit + 1` bytes."""
    size = min(limit + 1, max(_FIRST_BUFFER, 4 * len(data)))
    while True:
        buffer = bytearray(size)
        try:
            n = decompress_into(data, buffer)
        except cramjam.DecompressionError as e:
            if size > limit:  # no larger buffer to try: too large, or corrupt
                raise DecompressionRefused(f"{name}: {e} (output limited to {limit} bytes)") from None
            size = min(limit + 1, size * 4)
            continue
        _check_size(n, limit, name)
        return memoryview(buffer)[:n]


def _check_size(size: int, limit: int, name: str) -> None:
    if size > limit:
        raise DecompressionRefused(f"{name}: the batch decompresses to more than {limit} bytes")
