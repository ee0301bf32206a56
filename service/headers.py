"""Kafka headers of a job: read as text, their keys checked, the deadline header parsed.

Header keys and values come from the producer: a key that is not UTF-8 is refused by name
(with its bytes escaped in the message), values are decoded leniently, and the deadline must
be a plausible Unix time in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from schemas.codec import JobDecodeError

_MAX_TIME_MS = 2**53  # past any real date, and still exact as a float


class DeadlineExceeded(Exception):
    pass


def header_deadline(headers: dict[str, str]) -> float | None:
    """The `sluice-deadline-ms` header (Unix time in milliseconds) in seconds; None if absent."""
    raw = headers.get("sluice-deadline-ms")
    if not raw:
        return None
    try:
        deadline_ms = int(raw)
    except ValueError:
        deadline_ms = -1
    if not 0 <= deadline_ms < _MAX_TIME_MS:
        raise JobDecodeError(
            "invalid_request",
            f"the sluice-deadline-ms header must be Unix time in milliseconds, got {excerpt(raw)!r}",
        )
    return deadline_ms / 1000


def check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.time() >= deadline:
        late_ms = (time.time() - deadline) * 1000
        raise DeadlineExceeded(f"the job's deadline passed {late_ms:.0f} ms ago, {when}; it was not run")


def header_dict(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka headers as a dict of lower-cased names to text values (the last one wins)."""
    out: dict[str, str] = {}
    for key, value in headers or ():
        if value is not None:
            out[key.lower()] = value.decode("utf-8", "replace")
    return out


def check_header_keys(headers: Sequence[tuple[str, bytes | None]] | None) -> None:
    """JobDecodeError(invalid_encoding) when a header key is not UTF-8."""
    if bad := undecodable_header_keys(headers):
        keys = ", ".join(excerpt(repr(key)) for key in bad[:3])
        raise JobDecodeError("invalid_encoding", f"header keys are not valid UTF-8: {keys}")


def undecodable_header_keys(headers: Sequence[tuple[str, bytes | None]] | None) -> list[bytes]:
    """The raw bytes of each header key that is not UTF-8 (service/lenient_records.py reads
    such a key with `surrogateescape`: lone surrogates, which no valid UTF-8 decodes to)."""
    return [key.encode("utf-8", "surrogateescape") for key, _ in headers or () if _has_surrogates(key)]


def printable_key(key: str) -> str:
    """A header key as a producer can write it again: bytes that are not UTF-8 as `\\xff` escapes."""
    if not _has_surrogates(key):
        return key
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def excerpt(text: str, limit: int = 64) -> str:
    """`text`, cut to `limit` characters for an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _has_surrogates(text: str) -> bool:
    return not text.isascii() and any("\udc80" <= ch <= "\udcff" for ch in text)
