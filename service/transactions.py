"""TransactionalDelivery: exactly-once results, each partition's in one Kafka transaction.

A finished job's records (its result, and a dead letter for a failed job) are staged, not
sent. A commit takes, per input partition, every staged record below the partition's
watermark and sends them together with the new consumer offset in one transaction
(`send_offsets_to_transaction`): a reader with isolation_level=read_committed sees a job's
result exactly when the job's offset is committed, and never twice.

aiokafka predates KIP-447 (fencing by consumer-group generation), so zombies are fenced the
older way: one transactional id per input partition, `<prefix>.<topic>.<partition>`. Whoever
is assigned a partition starts a producer with its id and waits for its producer id, which
fences the previous owner (its open transaction is aborted, one it was committing finishes
first, its later commits fail); only then does the consumer read the committed offset and start
the partition there (starts_at). A producer is started only that way: a commit that fails, or
whose outcome is unknown (the broker died as it answered), drops what is staged and asks for the
partition to be restarted (restarts()): fenced again, re-read, redone from what the broker
committed. Re-creating the producer on the spot would fence whoever owns the partition now and
resend records that may already be committed.

A record the broker refuses for itself (too large, a topic not ours to write, an invalid record)
would fail every retry of its transaction. Such refusals are kept by offset (refusal()) across
the restart, so that the redone job is delivered as a small error result and dead letter
instead (service/delivery.py); consecutive_failures counts each partition's failed
transactions in a row.

Transactions cost a round trip or two each, so they run per commit interval, not per job;
results reach read_committed readers up to one interval later than at-least-once results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownError,
    UnknownTopicOrPartitionError,
)

from service.publisher import Headers, PublishRefused
from service.topics import RecentTopics, never_create_topics

log = logging.getLogger(__name__)

FENCE_TIMEOUT_S = 30.0  # a partition's producer not started by then (broker down): retried later
FENCED_RESTART_S = 10.0  # a fenced partition the group has not moved by then is restarted here
# What the broker says of one record, not of the transaction: the same record fails every retry.
# (INVALID_RECORD, error 87, reaches aiokafka as UnknownError.)
_RECORD_REFUSALS = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
    InvalidTopicError,
    CorruptRecordException,
    InvalidTimestampError,
    UnknownError,
)


class _RecordsRefused(Exception):
    """Raised inside a transaction to abort it: the broker refused records of it."""


@dataclass(slots=True, frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


class TransactionalDelivery:
    """An OffsetSink (service.consumer) that publishes staged records in the offsets' transaction."""

    refetch_committed = True

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        client_id: str,
        transactional_id_prefix: str,
        security: dict | None = None,  # SASL/TLS client options (service.kafka_security)
        producer_factory: Callable[..., AIOKafkaProducer] = AIOKafkaProducer,
        keep_topics: Iterable[str] = (),  # the configured topics; others (reply topics) are dropped when idle
        compression_type: str | None = None,  # gzip, snappy, lz4 or zstd; None: uncompressed
    ) -> None:
        self._compression_type = compression_type
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._client_id = client_id
        self._prefix = transactional_id_prefix or group_id
        self._new_producer = producer_factory
        self._security = security or {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}  # the partitions it commits for
        # One start at a time per partition: two producers with one transactional id fence each other.
        self._starting: dict[TopicPartition, asyncio.Lock] = {}
        self._floor: dict[TopicPartition, int] = {}  # the committed offset: nothing below it is staged
        self._committed_here: dict[
            TopicPartition, int
        ] = {}  # the last offset each transaction here committed
        self._restarts: dict[TopicPartition, float] = {}  # partitions to restart, and from when on
        self._staged: dict[TopicPartition, dict[int, list[OutRecord]]] = {}
        self._keep_topics = set(keep_topics)
        self._recent: dict[TopicPartition, RecentTopics] = {}  # what each partition's producer sent to lately
        # records the broker refused, by the job's partition and offset: the refusal, how many times
        self._refused: dict[TopicPartition, dict[int, tuple[PublishRefused, int]]] = {}
        self.consecutive_failures: dict[TopicPartition, int] = {}  # failed transactions in a row
        self.num_transactions = 0

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self._prefix}.{tp.topic}.{tp.partition}"

    def stage(self, tp: TopicPartition, offset: int, records: list[OutRecord]) -> None:
        """A job's records, to be published with the commit that passes its offset. Refused for a
        partition it does not commit for now, and below the partition's committed offset (a job
        that was already answered, whose result would be published a second time)."""
        if tp not in self._producers:
            return  # revoked, fenced or restarting: the partition's next start redoes the job
        if offset < self._floor.get(tp, 0):
            log.warning(
                "%s: a result at offset %d, below the committed %d, refused",
                _name(tp),
                offset,
                self._floor[tp],
            )
            return
        self._staged.setdefault(tp, {})[offset] = records

    def refusal(self, tp: TopicPartition, offset: int) -> tuple[PublishRefused, int] | None:
        """How the broker refused a record of the job at `offset` in an earlier transaction (and
        how many times): its records must be staged smaller, without what was refused."""
        return self._refused.get(tp, {}).get(offset)

    def num_staged(self) -> int:
        return sum(len(s) for s in self._staged.values())

    async def assigned(self, partitions: set[TopicPartition]) -> set[TopicPartition]:
        """Start each partition's producer and wait for its producer id: this fences the
        partition's previous owner. Returns the partitions started; the others are in restarts()."""
        partitions = set(partitions)
        for tp in partitions:
            self._restarts.pop(tp, None)
            self._staged.pop(tp, None)
            self._floor.pop(tp, None)
        started = await asyncio.gather(*(self._start(tp) for tp in partitions))
        return {tp for tp, ok in zip(partitions, started, strict=True) if ok}

    def starts_at(self, committed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Where to consume the started partitions from: their committed offsets, read after the
        fence, or what this process itself committed last if that is further (a read that raced
        the markers of its own last transaction)."""
        offsets = {tp: max(o, self._committed_here.get(tp, o)) for tp, o in committed.items()}
        self._floor.update(offsets)
        return offsets

    def restarts(self) -> set[TopicPartition]:
        """Partitions whose producer failed or was fenced: to be fenced, re-read and redone (assigned())."""
        now = time.monotonic()
        return {tp for tp, when in self._restarts.items() if when <= now}

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """The partitions' last commit is done: drop what is left (the next owner redoes it). A
        partition restarted here (restarts()) keeps its refusals and failure count."""
        for tp in partitions:
            if self._restarts.pop(tp, None) is None:
                self._refused.pop(tp, None)
                self.consecutive_failures.pop(tp, None)
            self._floor.pop(tp, None)
            dropped = self._staged.pop(tp, {})
            if dropped:
                log.info("%s: %d staged results dropped with the partition", _name(tp), len(dropped))
            await self._close(tp)

    async def commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        results = await asyncio.gather(*(self._commit_partition(tp, o) for tp, o in offsets.items()))
        return {tp: o for (tp, o), ok in zip(offsets.items(), results, strict=True) if ok}

    async def stop(self) -> None:
        for tp in list(self._producers):
            await self._close(tp)

    async def _commit_partition(self, tp: TopicPartition, offset: int) -> bool:
        producer = self._producers.get(tp)
        if producer is None:
            return False  # not started (yet), or given up: a restart redoes its jobs
        staged = self._staged.get(tp, {})
        offsets = sorted(o for o in staged if o < offset)
        records = [r for o in offsets for r in staged[o]]
        refused: dict[int, PublishRefused] = {}
        try:
            # Commits on success; on an error aborts, unless the producer is fenced (fatal).
            async with producer.transaction():
                await _send_all(producer, {o: staged[o] for o in offsets}, refused)
                await producer.send_offsets_to_transaction({tp: offset}, self._group_id)
        except ProducerFenced:
            # Another instance owns the partition now and redoes these jobs. Should the group still
            # say it is ours once it has had time to rebalance, it is restarted (fenced back).
            await self._give_up(
                tp, f"fenced by a newer owner; {len(offsets)} staged results dropped", FENCED_RESTART_S
            )
            return False
        except (KafkaError, _RecordsRefused) as e:
            # Aborted, or committed with the reply lost: only the broker knows, so the partition is
            # restarted from its committed offset rather than these records sent again. Jobs whose
            # records the broker refused are redone as small error results (refusal()).
            self._note_refusals(tp, refused)
            await self._give_up(tp, f"transaction failed ({e}); restarting from the committed offset", 0.0)
            return False
        recent = self._recent.setdefault(tp, RecentTopics(self._keep_topics))
        for r in records:
            recent.sent(r.topic)
        recent.prune(producer)
        for o in offsets:
            del staged[o]
        if tp in self._refused:  # the jobs they were for are committed
            self._refused[tp] = {o: r for o, r in self._refused[tp].items() if o >= offset}
        self.consecutive_failures[tp] = 0
        self._floor[tp] = self._committed_here[tp] = offset
        self.num_transactions += 1
        return True

    def _note_refusals(self, tp: TopicPartition, refused: dict[int, PublishRefused]) -> None:
        known = self._refused.setdefault(tp, {})
        for o, refusal in refused.items():
            times = known[o][1] + 1 if o in known else 1
            known[o] = (refusal, times)
            log.warning("%s: job at offset %d: %s; it is redone as an error result", _name(tp), o, refusal)

    async def _give_up(self, tp: TopicPartition, why: str, restart_after_s: float) -> None:
        self.consecutive_failures[tp] = self.consecutive_failures.get(tp, 0) + 1
        log.warning("%s: %s", _name(tp), why)
        self._staged.pop(tp, None)
        self._restarts[tp] = time.monotonic() + restart_after_s
        await self._close(tp)

    async def _start(self, tp: TopicPartition) -> bool:
        async with self._starting.setdefault(tp, asyncio.Lock()):
            await self._close(tp)
            producer = self._new_producer(
                bootstrap_servers=self._bootstrap,
                client_id=f"{self._client_id}-txn",
                transactional_id=self.transactional_id(tp),
                enable_idempotence=True,
                acks="all",
                compression_type=self._compression_type,
                **self._security,
            )
            if (client := getattr(producer, "client", None)) is not None:  # tests' stand-ins have none
                never_create_topics(client)  # a reply topic its run deleted stays deleted
            try:
                # start() returns before InitProducerId; an empty transaction waits for the producer
                # id, i.e. for the fence (and for a previous transaction to finish), sending nothing.
                await asyncio.wait_for(_fence(producer), FENCE_TIMEOUT_S)
            except (KafkaError, TimeoutError) as e:
                log.warning("%s: starting its producer failed (%s); retrying", _name(tp), e or "timeout")
                self._restarts[tp] = time.monotonic()
                await _stop(producer, tp)
                return False
            except BaseException:  # cancelled (shutdown): no producer left behind
                await _stop(producer, tp)
                raise
            self._producers[tp] = producer
            return True

    async def _close(self, tp: TopicPartition) -> None:
        self._recent.pop(tp, None)
        producer = self._producers.pop(tp, None)
        if producer is not None:
            await _stop(producer, tp)


async def _send_all(
    producer: AIOKafkaProducer, records: dict[int, list[OutRecord]], refused: dict[int, PublishRefused]
) -> None:
    """Send each job's records (by offset) and wait for every acknowledgement. A record the broker
    (or the client, for its size) refuses for itself goes into `refused` under its job's offset;
    any failure raises, which aborts the transaction."""
    sent = []
    for offset, out in records.items():
        for r in out:
            try:
                sent.append(
                    (
                        offset,
                        r.topic,
                        await producer.send(r.topic, value=r.value, key=r.key, headers=r.headers),
                    )
                )
            except _RECORD_REFUSALS as e:
                refused.setdefault(offset, PublishRefused(r.topic, e))
    results = await asyncio.gather(*(future for *_, future in sent), return_exceptions=True)
    failure = None
    for (offset, topic, _), result in zip(sent, results, strict=True):
        if isinstance(result, _RECORD_REFUSALS):
            refused.setdefault(offset, PublishRefused(topic, result))
        elif isinstance(result, BaseException):
            failure = failure or result
    if failure is not None:
        raise failure
    if refused:
        raise _RecordsRefused(f"the broker refused records of {len(refused)} jobs")


async def _fence(producer: AIOKafkaProducer) -> None:
    await producer.start()
    async with producer.transaction():
        pass


async def _stop(producer: AIOKafkaProducer, tp: TopicPartition) -> None:
    try:
        await producer.stop()
    except KafkaError as e:
        log.debug("%s: closing the producer: %s", _name(tp), e)


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"
