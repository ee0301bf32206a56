"""Hostile records mixed into a chaos run's job stream, and the count of their answers.

Each is a record no well-behaved producer writes (tests/service/hostile.py builds them as they
are, bad header keys included): every one must end as an error result and a dead letter, through
kill -9s, leader moves and rebalances. A hostile record is answered when the dead-letter topic,
read as a read_committed reader reads it, holds a dead letter naming its partition and offset.
The instances take jobs of at most MAX_JOB_BYTES, so that the oversized record is small.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter

from loadtest.chaos_cluster import ResultsReader
from tests.service.hostile import RawRecord, gzip_bomb, post_batch, post_raw

MAX_JOB_BYTES = 65_536  # SLUICE_MAX_JOB_BYTES of the chaos run's instances
_GZIP = 1
_ZSTD = 4


def _job(custom_id: str, **body) -> bytes:
    body = {"prompt": "hi", "max_tokens": 2, **body}
    return json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}).encode()


def hostile_records(jobs_topic: str) -> list[tuple[str, RawRecord | bytes, int]]:
    """(what it is, the record or a batch built byte by byte, its batch's codec)."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return [
        ("invalid JSON", RawRecord(b'{"custom_id": "h-json", "url": ', b"h-json"), 0),
        ("bad UTF-8", RawRecord(b'{"custom_id": "h-\xff\xfe"}', b"h-utf8"), 0),
        ("oversized", RawRecord(_job("h-big", prompt="word " * MAX_JOB_BYTES), b"h-big"), 0),
        ("header key not UTF-8", RawRecord(_job("h-hkey"), b"h-hkey", [(b"\xff\xfebad", b"v")]), 0),
        ("reply_to the jobs topic", RawRecord(_job("h-rt1"), b"h-rt1", [(b"reply_to", jobs_topic.encode())]), 0),
        ("reply_to not a topic name", RawRecord(_job("h-rt2"), b"h-rt2", [(b"reply_to", b"bad topic!")]), 0),
        ("msgpack content-type, JSON bytes", RawRecord(_job("h-ct"), b"h-ct", [(b"content-type", b"application/msgpack")]), 0),
        ("unknown url", RawRecord(json.dumps({"custom_id": "h-url", "url": "/v2/x", "body": {}}).encode(), b"h-url"), 0),
        ("no custom_id", RawRecord(json.dumps({"url": "/v1/completions", "body": {"prompt": "hi"}}).encode(), b"h-noid"), 0),
        ("nested 20,000 deep", RawRecord(_job("h-deep", prompt=None).replace(b"null", b"[" * 20_000 + b"]" * 20_000), b"h-deep"), 0),
        ("null value", RawRecord(None, b"h-null"), 0),
        ("max_tokens a string", RawRecord(_job("h-maxtok", max_tokens="many"), b"h-maxtok"), 0),
        ("empty stop string", RawRecord(_job("h-stop", stop=["end", ""]), b"h-stop"), 0),
        ("a job's own chat_template", RawRecord(json.dumps({"custom_id": "h-tmpl", "url": "/v1/chat/completions", "body": {**chat, "chat_template": "{{ 1 }}"}}).encode(), b"h-tmpl"), 0),
        ("deadline of 400 digits", RawRecord(_job("h-dl").replace(b'"hi"', b'"hi", "sluice_deadline_ms": ' + b"9" * 400), b"h-dl"), 0),
        ("invalid JSON in a zstd batch", RawRecord(b"{{{", b"h-zstd"), _ZSTD),
        ("gzip bomb: 64 MiB of zeros", gzip_bomb(64 << 20), _GZIP),
    ]  # fmt: skip


async def post_hostile(
    bootstrap: str, topic: str, partition: int, record: RawRecord | bytes, codec: int
) -> int:
    """Posts one hostile record as a batch of its own; returns its offset."""
    if isinstance(record, bytes):
        return (await post_batch(bootstrap, topic, partition, record)).offset
    return (await post_raw(bootstrap, topic, partition, [record], codec)).offset


class DeadLetterReader(ResultsReader):
    """Reads the dead-letter topic as a read_committed reader: the (partition, offset) each dead
    letter names, how often, and its error code."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(bootstrap, topic, partitions)
        self.sources: Counter[tuple[int, int]] = Counter()
        self.codes: dict[tuple[int, int], str] = {}

    def _count(self, record) -> None:
        headers = {k: v for k, v in record.headers}
        with contextlib.suppress(KeyError, ValueError):
            source = int(headers["sluice-source-partition"]), int(headers["sluice-source-offset"])
            self.sources[source] += 1
            self.codes[source] = headers.get("sluice-error-code", b"?").decode(errors="replace")
