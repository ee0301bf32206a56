"""OutcomeDelivery: a job's outcome records onto Kafka, whatever the broker says about them.

at_least_once: published now, each acknowledged before the job counts as done; exactly_once:
staged for the partition's next transaction (service/transactions.py). Records that the broker
can never take do not stop the partition: a result too large for it, or one whose reply topic is
missing or not ours to write, becomes an error result on the results topic plus a dead letter
(exactly_once: when the job is redone after the transaction the broker refused it in).
Records for the configured topics are retried until the broker takes them (an outage only
delays them; nothing is lost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from schemas.codec import JSON
from service.jobs import Outcome
from service.lenient_records import UndecodableBatch
from service.publisher import Headers, PublishRefused, ResultPublisher
from service.records import error_outcome, outcome_records, record_ref, undecodable_dead_letter
from service.transactions import OutRecord, TransactionalDelivery
from service.translate import to_error_line

log = logging.getLogger(__name__)

_BATCH_OVERHEAD = 512  # bytes a record batch of one record takes beyond the record
_REFUSED_MAX_BYTES = 16_384  # after a size refusal, the error result and dead letter must be small


class OutcomeDelivery:
    def __init__(
        self,
        publisher: ResultPublisher,
        transactions: TransactionalDelivery | None,
        results_topic: str,
        dlq_topic: str,
        max_result_bytes: int,
    ) -> None:
        self._publisher = publisher
        self._transactions = transactions
        self._results_topic = results_topic
        self._dlq_topic = dlq_topic
        self._max_bytes = max_result_bytes

    def fit_topics(self, max_message_bytes: dict[str, int]) -> None:
        """Keep records below what the results and dead-letter topics take (`max.message.bytes`):
        the broker refusing a record costs the publisher its producer (see ResultPublisher)."""
        limits = [
            v - _BATCH_OVERHEAD
            for t, v in max_message_bytes.items()
            if t in (self._results_topic, self._dlq_topic)
        ]
        if limits and min(limits) < self._max_bytes:
            self._max_bytes = min(limits)
            log.info(
                "results and dead letters kept below %d bytes (the topics' max.message.bytes)",
                self._max_bytes,
            )

    async def deliver(
        self,
        record: ConsumerRecord,
        outcome: Outcome,
        trace_headers: Headers,
        is_current: Callable[[], bool] = lambda: True,
    ) -> Outcome | None:
        """Publish or stage the outcome's records; returns the outcome as delivered (an error
        result where the broker refused the job's own result). exactly_once: None, nothing staged,
        when `is_current()` says the job's partition assignment ended while it ran (checked just
        before staging, after the last await)."""
        if outcome.reply_to is not None:
            try:
                await self._publisher.check_topic(outcome.reply_to)
            except PublishRefused as e:
                outcome = _refused(outcome, e)
        if self._transactions is not None:
            tp = TopicPartition(record.topic, record.partition)
            outcome, out = self._staged_records(tp, record, outcome, trace_headers)
            if not is_current():
                return None
            self._transactions.stage(tp, record.offset, out)
            return outcome
        outcome, out = self._records(record, outcome, trace_headers, self._max_bytes)
        try:
            await self._publish(out, result_refusable=outcome.reply_to is not None)
        except PublishRefused as e:  # nothing of this outcome is published yet
            outcome = _refused(outcome, e)
            budget = _REFUSED_MAX_BYTES if e.is_too_large else self._max_bytes
            outcome, out = self._records(record, outcome, trace_headers, budget)
            await self._publish(out, result_refusable=False)
        return outcome

    async def deliver_internal_error(
        self,
        record: ConsumerRecord,
        error: Exception,
        is_current: Callable[[], bool] = lambda: True,
        request_id: str | None = None,
    ) -> Outcome | None:
        """An `internal_error` result (under the job's `request_id`) for a job that a fault of
        Sluice's own stopped; None when even that cannot be delivered, or is not delivered (see
        deliver): the job stays uncommitted, its next owner redoes it."""
        message = f"{type(error).__name__}: {error}"
        result = to_error_line(record_ref(record), "internal_error", message, 500, request_id=request_id)
        try:
            return await self.deliver(
                record, Outcome(result, JSON, None, request_id=result.response.request_id), [], is_current
            )
        except Exception:
            log.exception("job %s: its error result could not be delivered either", record_ref(record))
            return None

    async def deliver_undecodable(
        self, record: ConsumerRecord, failure: UndecodableBatch, is_current: Callable[[], bool] = lambda: True
    ) -> bool:
        """A dead letter for a batch that could not be read (`record` is its marker): published,
        or staged at the batch's last offset; False when its assignment ended (see deliver)."""
        letter = undecodable_dead_letter(record, failure, self._dlq_topic)
        if self._transactions is not None:
            if not is_current():
                return False
            self._transactions.stage(TopicPartition(record.topic, record.partition), record.offset, [letter])
            return True
        await self._publisher.publish(letter.topic, letter.key, letter.value, letter.headers)
        return True

    def _staged_records(
        self, tp: TopicPartition, record: ConsumerRecord, outcome: Outcome, trace_headers: Headers
    ) -> tuple[Outcome, list[OutRecord]]:
        """exactly_once: the outcome's records, or, for a job whose records the broker refused in an
        earlier transaction, smaller ones: its dead letter without the job's bytes (when that was
        what the broker refused), else an error result; the second time, nothing of the job."""
        assert self._transactions is not None
        if (refused := self._transactions.refusal(tp, record.offset)) is None:
            return self._records(record, outcome, trace_headers, self._max_bytes)
        refusal, times = refused
        if refusal.topic == self._dlq_topic and outcome.is_error and times == 1:
            return self._records(record, outcome, trace_headers, _REFUSED_MAX_BYTES, copy_job=False)
        outcome = _refused(outcome, refusal)
        return self._records(
            record, outcome, trace_headers if times == 1 else [], _REFUSED_MAX_BYTES, copy_job=times == 1
        )

    def _records(
        self,
        record: ConsumerRecord,
        outcome: Outcome,
        trace_headers: Headers,
        max_bytes: int,
        copy_job: bool = True,
    ) -> tuple[Outcome, list[OutRecord]]:
        return outcome_records(
            record, outcome, trace_headers, self._results_topic, self._dlq_topic, max_bytes, copy_job
        )

    async def _publish(self, out: list[OutRecord], result_refusable: bool) -> None:
        """The result first: a refused result leaves nothing published. A dead letter, or a
        result for the results topic, the broker refuses only for its size."""
        for i, r in enumerate(out):
            try:
                await self._publisher.publish(
                    r.topic, r.key, r.value, r.headers, refusable=result_refusable and i == 0
                )
            except PublishRefused as e:
                if i == 0:
                    raise
                log.error("dead letter to %s refused (%s); sent without the job's bytes", r.topic, e)
                reason = [(k, v) for k, v in r.headers if k.startswith("sluice-")]
                small = OutRecord(
                    r.topic, None, b"", [*reason, ("sluice-dropped", b"value, key and headers")]
                )
                await self._publisher.publish(small.topic, small.key, small.value, small.headers)


def _refused(outcome: Outcome, refusal: PublishRefused) -> Outcome:
    if refusal.is_too_large:
        code, message = "result_too_large", f"the broker refused the result as too large ({refusal.error})"
    else:
        code, message = "invalid_reply_to", f"the result could not go to its reply_to: {refusal}"
    if (error := outcome.result.failure) is not None:
        message += f"; the job itself had failed: {error.code}: {error.message}"
    return error_outcome(outcome, code, message)
