"""The run ledger, `<OUTPUT>.run`: the run id and every job posted to Kafka whose post was acknowledged.

It is what lets a resumed run wait for jobs that are still queued (the service answers them
later, into the run's reply topic) instead of posting them again. A job is recorded only after
the broker acknowledged it: a job recorded here is in Kafka. A kill between the acknowledgement
and the record only means the job is posted once more; the output never takes a row twice.

It also records the topics the run created (its reply topic, unless it existed before): only
those are deleted when the run is complete.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import msgspec

RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")  # it names a Kafka topic too


class LedgerError(ValueError):
    pass


class _CreatedTopic(msgspec.Struct, forbid_unknown_fields=True):
    created_topic: str


_RECORD = msgspec.json.Decoder(tuple[str | int, int] | _CreatedTopic)  # a posted job, or a created topic


class RunLedger:
    def __init__(
        self, path: Path | None, run_id: str, attempts: Counter[str], created_topics: list[str] | None = None
    ) -> None:
        self.path = path
        self.run_id = run_id
        self.attempts = attempts  # row key -> the attempt number of its latest posted job
        self.created_topics = created_topics or []  # topics this run created, to delete when complete
        self._file = None

    @classmethod
    def open(cls, path: Path, kind: str, run_id: str | None) -> RunLedger:
        """The existing ledger (its run id must match `run_id` if one is given), else a new one."""
        attempts: Counter[str] = Counter()
        created_topics: list[str] = []
        if path.exists():
            data = path.read_bytes()
            good = data.rfind(b"\n") + 1  # a kill may tear the last record; it is dropped
            lines = data[:good].split(b"\n")[:-1]
            try:
                header = msgspec.json.decode(lines[0]) if lines else {}
                for line in lines[1:]:
                    match _RECORD.decode(line):
                        case _CreatedTopic(created_topic=topic):
                            created_topics.append(topic)
                        case (key, attempt):
                            attempts[str(key)] = max(attempts[str(key)], attempt)
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
            return cls(path, header["run_id"], attempts, created_topics)
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
        self._append([[key, attempt] for key, attempt in posted])

    def record_created_topics(self, topics: list[str]) -> None:
        """Topics the run has just created: the run deletes them, and no others, once complete."""
        self.created_topics += [t for t in topics if t not in self.created_topics]
        self._append([_CreatedTopic(t) for t in topics])

    def _append(self, records: list) -> None:
        if self.path is None or not records:
            return
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 (kept open for the whole run)
        self._file.write(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
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
