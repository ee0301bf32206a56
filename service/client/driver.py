"""The run loop shared by `sluice label` and `sluice batch`: post what is not done, write what comes back.

Exactly one line per row, whatever happens: a row is posted only if the output has no line
for it (and, through Kafka, no acknowledged job still waiting for its answer); a result is
written only if it answers the row's latest job and the row has no line yet. Results that
arrive twice (at-least-once delivery, a job posted again after a kill) are dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from schemas.batch import BatchRequestEnvelope, BatchResponseLine
from schemas.codec import decode_result, encode_job
from service.client.ledger import RunLedger
from service.client.progress import RunProgress
from service.client.results import read_result

POST_CHUNK = 256  # jobs posted (and recorded in the ledger) together


@dataclass(slots=True)
class WorkItem:
    key: str  # the row's identity in the output
    row_id: Any  # what the output names the row by
    job: BatchRequestEnvelope | None  # the OpenAI Batch input line; its custom_id is set when posted
    # (code, message, param): the row cannot become a job, it gets an error line
    error: tuple[str, str, str | None] | None = None


class Backend(Protocol):
    async def submit(self, jobs: list[tuple[str, bytes]]) -> None: ...
    def results(self): ...


class Output(Protocol):
    done: set[str]
    errors: dict[str, str]

    def add(self, records: list[Any]) -> None: ...


@dataclass(slots=True)
class RunStats:
    written: int = 0  # lines written by this invocation
    posted: int = 0
    waited_for: int = 0  # jobs posted by an earlier invocation, answered in this one
    output_tokens: int = 0
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)  # rows still unanswered when the run gave up

    @property
    def is_complete(self) -> bool:
        return not self.pending


class RunDriver:
    def __init__(
        self,
        output: Output,
        ledger: RunLedger,
        backend: Backend,
        result_record: Callable[[str, Any, BatchResponseLine], Any],
        failure_record: Callable[[str, Any, str, str], Any],
        progress: RunProgress,
        idle_timeout: float,
    ) -> None:
        self.output = output
        self.ledger = ledger
        self.backend = backend
        self.result_record = result_record  # (key, row_id, result line) -> output record
        self.failure_record = failure_record  # (key, row_id, error code, message, param) -> output record
        self.progress = progress
        self.idle_timeout = idle_timeout
        self._expected: dict[str, tuple[str, Any]] = {}  # custom_id of a row's latest job -> (key, row_id)
        self.stats = RunStats()

    def expect_waiting(self, items: Iterable[WorkItem], waiting: set[str]) -> None:
        """Rows whose acknowledged jobs an earlier invocation posted: wait for their answers."""
        if not waiting:
            return
        for item in items:
            if item.key in waiting and item.key not in self.output.done:
                custom_id = self.ledger.custom_id(item.key, self.ledger.attempts[item.key])
                self._expected[custom_id] = (item.key, item.row_id)

    async def run(self, items: Iterable[WorkItem], waiting: set[str]) -> RunStats:
        started = time.monotonic()
        posting = asyncio.create_task(self._post(items, waiting))
        try:
            await self._collect(posting)
        finally:
            if not posting.done():
                posting.cancel()
            await asyncio.gather(posting, return_exceptions=True)
        if posting.done() and not posting.cancelled() and posting.exception() is not None:
            raise posting.exception()
        self.stats.seconds = time.monotonic() - started
        self.stats.pending = [key for key, _ in self._expected.values()]
        return self.stats

    async def _post(self, items: Iterable[WorkItem], waiting: set[str]) -> None:
        chunk: list[tuple[str, bytes]] = []
        attempts: list[tuple[str, int]] = []
        for item in items:
            if item.key in self.output.done or item.key in waiting:
                continue
            if item.error is not None:
                self._write([self.failure_record(item.key, item.row_id, *item.error)], 0)
                continue
            attempt = self.ledger.attempts[item.key] + 1
            custom_id = self.ledger.custom_id(item.key, attempt)
            self._expected[custom_id] = (item.key, item.row_id)  # before posting: its answer may be quick
            chunk.append((custom_id, encode_job(msgspec.structs.replace(item.job, custom_id=custom_id))))
            attempts.append((item.key, attempt))
            if len(chunk) >= POST_CHUNK:
                await self._submit(chunk, attempts)
                chunk, attempts = [], []
            await asyncio.sleep(0)  # let results be written while a large input is read
        await self._submit(chunk, attempts)

    async def _submit(self, chunk: list[tuple[str, bytes]], attempts: list[tuple[str, int]]) -> None:
        if chunk:
            await self.backend.submit(chunk)
            self.ledger.record_posted(attempts)  # only once acknowledged: a recorded job is in Kafka
            self.stats.posted += len(chunk)

    async def _collect(self, posting: asyncio.Task) -> None:
        last_answer = time.monotonic()
        async for batch in self.backend.results():
            records, tokens = [], 0
            for custom_id, value in batch:
                entry = self._expected.pop(custom_id, None)
                if entry is None or entry[0] in self.output.done:
                    continue  # a duplicate, or the answer to a job superseded by a retry
                key, row_id = entry
                try:
                    result = decode_result(value)
                except msgspec.DecodeError as e:  # not a result line
                    records.append(self.failure_record(key, row_id, "invalid_result", str(e)))
                    continue
                records.append(self.result_record(key, row_id, result))
                tokens += read_result(result).completion_tokens
            if records:
                self._write(records, tokens)
                last_answer = time.monotonic()
            if posting.done() and (posting.exception() if not posting.cancelled() else None):
                return
            if posting.done() and not self._expected:
                return
            if self._expected and time.monotonic() - last_answer > self.idle_timeout:
                return

    def _write(self, records: list[Any], tokens: int) -> None:
        errors_before = len(self.output.errors)
        self.output.add(records)
        self.stats.written += len(records)
        self.stats.output_tokens += tokens
        self.progress.update(len(records), tokens, len(self.output.errors) - errors_before)
