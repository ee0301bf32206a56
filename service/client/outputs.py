"""Output files that are also the run's record of what is done.

Each row's line is appended with one write, and a run reads the file back before it starts: a
row with a line is done. A kill can only tear the last line (it has no newline yet, or ends
inside a quoted CSV field); loading cuts that torn tail off, so the row is simply done again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from schemas.batch import BatchResponseLine
from schemas.codec import decode_result
from service.client.results import read_result, token_logprobs

OUTPUT_FORMATS = ("jsonl", "csv")


class OutputError(ValueError):
    """The output file cannot be resumed (not ours, or damaged before its last line)."""


def output_format(path: Path, given: str | None = None) -> str:
    if given:
        return given
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


class RecordFile:
    """Records appended to a JSONL or CSV file, one write per batch of records.

    A record is a dict of `columns`, or (JSONL only) a msgspec Struct; `decode_line` reads a JSONL
    line back (default: a JSON object, as a dict).
    """

    def __init__(
        self, path: Path, fmt: str, columns: list[str], decode_line: Callable[[bytes], Any] | None = None
    ) -> None:
        self.path = path
        self.fmt = fmt
        self.columns = columns
        self.decode_line = decode_line or _decode_object
        self._file: io.BufferedWriter | None = None

    def load(self) -> list[Any]:
        """The complete records now in the file; a torn last record is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, good = (self._load_csv if self.fmt == "csv" else self._load_jsonl)(data)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

    def append(self, records: list[Any]) -> None:
        if not records:
            return
        if self._file is None:
            is_new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "ab")  # noqa: SIM115 (kept open for the whole run)
            if is_new and self.fmt == "csv":
                self._file.write(self._encode_csv([dict(zip(self.columns, self.columns, strict=True))]))
        data = self._encode_csv(records) if self.fmt == "csv" else b"".join(self._encode_jsonl(records))
        self._file.write(data)  # one write: a kill leaves whole records plus at most one torn one
        self._file.flush()

    def rewrite(self, records: list[Any]) -> None:
        """Replace the file's content atomically (write a copy, then rename it over the file)."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        RecordFile(tmp, self.fmt, self.columns, self.decode_line).append_and_close(records)
        if not tmp.exists():
            tmp.write_bytes(b"")
        os.replace(tmp, self.path)

    def append_and_close(self, records: list[Any]) -> None:
        self.append(records)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _encode_jsonl(self, records: list[Any]) -> list[bytes]:
        return [msgspec.json.encode(r) + b"\n" for r in records]

    def _encode_csv(self, records: list[dict[str, Any]]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for r in records:
            writer.writerow([_csv_cell(r.get(c)) for c in self.columns])
        return buffer.getvalue().encode()

    def _load_jsonl(self, data: bytes) -> tuple[list[Any], int]:
        good = data.rfind(b"\n") + 1  # a last line without its newline is torn
        records = []
        for number, line in enumerate(data[:good].split(b"\n")[:-1]):
            try:
                records.append(self.decode_line(line))
            except (msgspec.DecodeError, ValueError) as e:
                raise OutputError(f"{self.path}: line {number + 1} cannot be read ({e})") from None
        return records, good

    def _load_csv(self, data: bytes) -> tuple[list[dict[str, Any]], int]:
        good = data.rfind(b"\n") + 1
        lines = [line + "\n" for line in data[:good].decode("utf-8", "replace").split("\n")[:-1]]
        reader = csv.reader(iter(lines), strict=True)
        rows: list[list[str]] = []
        complete_lines = 0
        try:
            for row in reader:
                rows.append(row)
                complete_lines = reader.line_num
        except csv.Error:  # the last record ends inside a quoted field: torn
            good = len("".join(lines[:complete_lines]).encode())
        if not rows:
            return [], good
        header, *body = rows
        if header != self.columns:
            raise OutputError(f"{self.path}: its columns are {header}, expected {self.columns}")
        return [dict(zip(header, row, strict=False)) for row in body], good


def _decode_object(line: bytes) -> dict[str, Any]:
    record = msgspec.json.decode(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)


class _KeyedOutput:
    """An output file whose records each have a key: which keys are done, which failed."""

    def __init__(self, file: RecordFile) -> None:
        self.file = file
        self.errors: dict[str, str] = {}  # key -> error
        self.done: set[str] = set()
        for record in self.file.load():
            self._count(record)

    def drop_failed(self) -> set[str]:
        """Remove the failed keys' records (for --retry-errors); returns those keys."""
        if not self.errors:
            return set()
        failed = set(self.errors)
        self.file.rewrite([r for r in self.file.load() if self._key(r) not in failed])
        self.done -= failed
        self.errors = {}
        return failed

    def add(self, records: list[Any]) -> None:
        self.file.append(records)
        for record in records:
            self._count(record)

    def close(self) -> None:
        self.file.close()

    def _count(self, record: Any) -> None:
        key = self._key(record)
        self.done.add(key)
        if (error := self._error(record)) is not None:
            self.errors[key] = error

    def _key(self, record: Any) -> str:
        raise NotImplementedError

    def _error(self, record: Any) -> str | None:
        raise NotImplementedError


class LabelOutput(_KeyedOutput):
    """`sluice label`'s output: one record per input row (row id, label, choice probabilities, error)."""

    COLUMNS = ("row_id", "label", "probabilities", "error")

    def __init__(self, path: Path, fmt: str, with_logprobs: bool = False) -> None:
        columns = [*self.COLUMNS, "logprobs"] if with_logprobs else list(self.COLUMNS)
        self.labels: Counter[str] = Counter()
        super().__init__(RecordFile(path, fmt, columns))

    def _count(self, record: dict[str, Any]) -> None:
        super()._count(record)
        if not record.get("error"):
            self.labels[str(record.get("label") or "")] += 1

    def _key(self, record: dict[str, Any]) -> str:
        return str(record.get("row_id"))

    def _error(self, record: dict[str, Any]) -> str | None:
        return str(record["error"]) if record.get("error") else None


def label_record(row_id: Any, result: BatchResponseLine, logprobs: int | None = None) -> dict[str, Any]:
    """A result line -> the row's output record; `logprobs`: the alternatives a token's record
    keeps (None: no logprobs column)."""
    info = read_result(result)
    record = {"row_id": row_id, "label": info.text, "probabilities": info.probabilities, "error": info.error}
    if logprobs is not None:
        record["logprobs"] = token_logprobs(result, logprobs)
    return record


class BatchOutput(_KeyedOutput):
    """`sluice batch`'s output: OpenAI Batch output lines, one per input line, keyed by custom_id."""

    def __init__(self, path: Path) -> None:
        super().__init__(RecordFile(path, "jsonl", [], decode_line=decode_result))

    def _key(self, record: BatchResponseLine) -> str:
        return record.custom_id

    def _error(self, record: BatchResponseLine) -> str | None:
        return read_result(record).error
