"""The run ledger, `<OUTPUT>.run`: the run id and every job posted to Kafka whose post was acknowledged.

It is what lets a resumed run wait for jobs that are still queued (the service answers them
later, into the run's reply topic) instead of posting them again. A job is recorded only after
the broker acknowledged it: a job recorded here is in Kafka. A kill between the acknowledgement
and the record only means the job is posted once more; the output never takes a row twice.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import msgspec

RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")  # it names a Kafka topic too


class LedgerError(ValueError):
    pass


class RunLedger:
    def __init__(self, path: Path | None, run_id: str, attempts: Counter[str]) -> None:
        self.path = path
        self.run_id = run_id
        self.attempts = attempts  # row key -> the attempt number of its latest posted job
        self._file = None

    @classmethod
    def open(cls, path: Path, kind: str, run_id: str | None) -> RunLedger:
        """The existing ledger (its run id must match `run_id` if one is given), else a new one."""
        attempts: Counter[str] = Counter()
        if path.exists():
            data = path.read_bytes()
            good = data.rfind(b"\n") + 1  # a kill may tear the last record; it is dropped
            lines = data[:good].split(b"\n")[:-1]
            try:
                header = msgspec.json.decode(lines[0]) if lines else {}
                for line in lines[1:]:
                    key, attempt = msgspec.json.decode(line)
                    attempts[str(key)] = max(attempts[str(key)], int(attempt))
            except (msgspec.DecodeError, ValueError, TypeError) as e:
                raise LedgerError(f"{path} is damaged ({e}); remove it to resume by posting again") from None
            if header.get("kind") != kind or not header.get("run_id"):
                raise LedgerError(f"{path} does not belong to a `sluice {kind}` run")
            if run_id is not None and run_id != header["run_id"]:
                raise LedgerError(
                    f"{path} belongs to run {header['run_id']!r}, not {run_id!r}; "
                    "leave out --run-id to resume it, or choose another output file"
                )
            with open(path, "r+b") as f:
                f.truncate(good)
            return cls(path, header["run_id"], attempts)
        if run_id is None:
            run_id = f"{kind}-{_random_suffix()}"
        if not RUN_ID.match(run_id):
            raise LedgerError(f"run id {run_id!r}: use letters, digits, '.', '_' or '-' (at most 100)")
        path.write_bytes(msgspec.json.encode({"run_id": run_id, "kind": kind}) + b"\n")
        return cls(path, run_id, attempts)

    @classmethod
    def in_memory(cls, kind: str) -> RunLedger:
        """For --local runs: nothing outlives the process, so nothing is waited for on resume."""
        return cls(None, f"{kind}-local", Counter())

    def custom_id(self, key: str, attempt: int) -> str:
        """The job's custom_id: the run id and the row key; a retry's run part names its attempt."""
        return f"{self.run_id}/{key}" if attempt <= 1 else f"{self.run_id}~{attempt}/{key}"

    def record_posted(self, posted: list[tuple[str, int]]) -> None:
        if not posted:
            return
        for key, attempt in posted:
            self.attempts[key] = max(self.attempts[key], attempt)
        if self.path is None:
            return
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 (kept open for the whole run)
        self._file.write(b"".join(msgspec.json.encode([key, attempt]) + b"\n" for key, attempt in posted))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """The run is complete: the output alone records it."""
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _random_suffix() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
