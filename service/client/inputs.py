"""Input rows: JSONL, CSV or Parquet for `sluice label`; OpenAI Batch lines for `sluice batch`.

A row that cannot be read is not fatal: it comes back with `error` set, so the run writes an
error line for it and goes on.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from schemas.batch import BatchRequestEnvelope
from schemas.codec import JobDecodeError, decode_job_envelope, peek_custom_id

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class InputError(ValueError):
    """The input as a whole cannot be used (missing file, unknown format, duplicate row ids)."""


@dataclass(slots=True)
class InputRow:
    number: int  # 0-based position in the input
    row_id: Any  # the id column's value, or `number` without an id column
    fields: dict[str, Any] | None  # the row's columns; None when it could not be read
    error: str | None = None  # why the row could not be read

    @property
    def key(self) -> str:
        """The row's identity in the output file (ids are compared as text)."""
        return str(self.row_id)


def input_format(path: Path, given: str | None = None) -> str:
    if given:
        return given
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the format of {path} from its suffix; pass --input-format {FORMATS}")
    return fmt


def read_rows(path: Path, fmt: str, id_column: str | None) -> Iterator[InputRow]:
    """Every row of the file in order. Rows without a readable id get the id `#<number>`."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt]
    for number, fields, error in reader(path):
        if error is None and id_column is not None and fields.get(id_column) in (None, ""):
            error = f"the row has no value in the id column {id_column!r}"
        if error is not None:
            row_id = f"#{number}" if id_column is not None else number
            yield InputRow(number, row_id, None, error)
        else:
            yield InputRow(number, number if id_column is None else fields[id_column], fields)


def check_unique_keys(keys: Iterator[str]) -> int:
    """The number of rows; InputError names the first id that appears twice."""
    seen: dict[str, int] = {}
    for number, key in enumerate(keys):
        if key in seen:
            raise InputError(
                f"row id {key!r} appears twice (rows {seen[key]} and {number}); row ids must be unique"
            )
        seen[key] = number
    return len(seen)


@dataclass(slots=True)
class BatchLine:
    number: int  # 0-based line number among the non-blank lines
    custom_id: str  # the line's custom_id, or `line-<number>` when it has none
    job: BatchRequestEnvelope | None  # the line with its body kept as raw JSON
    # why the line is no job: the service's own error for the same bytes (code, message, param)
    error: JobDecodeError | None = None


def read_batch_lines(path: Path) -> Iterator[BatchLine]:
    """The lines of an OpenAI Batch input file, bodies untouched (the service checks them)."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    for number, raw in _numbered_lines(path):
        try:
            job = decode_job_envelope(raw)
        except JobDecodeError as e:
            custom_id = peek_custom_id(raw) or f"line-{number}"
            yield BatchLine(number, custom_id, None, e)
        else:
            yield BatchLine(number, job.custom_id, job)


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file, numbered from 0 without the blank ones."""
    with open(path, "rb") as f:
        yield from enumerate(raw for raw in f if raw.strip())


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    for number, raw in _numbered_lines(path):
        try:
            fields = msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            yield number, None, f"not a JSON line: {e}"
        else:
            if isinstance(fields, dict):
                yield number, fields, None
            else:
                yield number, None, f"not a JSON object but {type(fields).__name__}"


def _csv_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        for number, values in enumerate(reader):
            if len(values) != len(header):
                yield number, None, f"has {len(values)} fields, the header has {len(header)}"
            else:
                yield number, dict(zip(header, values, strict=True)), None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq  # imported only for Parquet input

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path} is not a readable Parquet file: {e}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for fields in batch.to_pylist():
            yield number, fields, None
            number += 1
