"""JobConsumer: the consumer group on the jobs topics, and the commits of finished work.

Auto-commit is off. An offset is committed only once every job below it is done (OffsetTracker);
offsets that hold no job (transaction markers, aborted transactions' records) count as done, so
the committed offset reaches the partition's end after a transactional producer's last commit.
commits run every `commit_interval_ms`, when partitions are revoked, and at shutdown. Who
commits is an OffsetSink: the consumer itself (at-least-once: "done" means the result is
acknowledged by the broker) or a transactional producer (exactly-once: "done" means the result
is staged, and the sink publishes it and commits its offset in one transaction).

Exactly-once starts a partition in three steps, and consumes none of it until they are done:
the sink fences the previous owner (whose last transaction may still move the committed
offset), the consumer reads the committed offset afresh and seeks there, then resumes it. A
partition whose producer failed is restarted the same way (its in-flight jobs are aborted).
Each record is consumed under its partition's current assignment (a generation): a job of an
earlier one, finishing late, counts for nothing (done() and Service's stage check it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from service import lenient_records
from service.kafka_security import KafkaClientOptions
from service.lenient_records import DEFAULT_MAX_BATCH_BYTES, UndecodableBatch, undecodable_batch
from service.offsets import OffsetTracker
from service.shutdown import bounded
from service.stable_offsets import committed_stable

log = logging.getLogger(__name__)

UNDECODABLE_BATCH_ATTEMPTS = 3  # reads of a batch that fails to decode before it is dead-lettered
POSITION_WAIT_S = 0.05  # how long a fetch waits for a partition's position that is being reset
# How long a start waits for the committed offsets (a pending transactional commit settles well
# within it); past it the partitions stay held and the commit loop starts them again.
COMMITTED_READ_TIMEOUT_S = 30.0


class OffsetSink(Protocol):
    """Where committable offsets go; returns the offsets it committed."""

    # True when the sink's assigned() may change what is committed (fencing a previous owner's
    # transaction): the consumer then starts the partitions from a fresh read of the commits,
    # holding them (paused) until then.
    refetch_committed: bool

    async def commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]: ...

    async def assigned(self, partitions: set[TopicPartition]) -> set[TopicPartition]:
        """Make ready to commit for the partitions; returns those that are (refetch_committed only)."""
        ...

    def starts_at(self, committed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Where to consume the started partitions from, given their committed offsets."""
        ...

    def restarts(self) -> set[TopicPartition]:
        """Partitions it cannot commit for until they are started again."""
        ...

    async def revoked(self, partitions: set[TopicPartition]) -> None: ...


class JobConsumer:
    def __init__(
        self,
        bootstrap: str,
        topics: list[str],
        group_id: str,
        client_id: str,
        commit_interval_ms: int,
        security: KafkaClientOptions | None = None,
        sink: OffsetSink | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        # a batch with a non-UTF-8 header key still reads; one that cannot be read (or would
        # decompress past max_batch_bytes) reads as a marker record
        lenient_records.install(max_batch_bytes)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            **(security or {}),
            group_id=group_id,
            client_id=f"{client_id}-jobs",
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a new group starts with the jobs already waiting
            isolation_level="read_committed",  # jobs from aborted producer transactions never run
        )
        self._topics = topics
        self._group_id = group_id
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._commit_interval = commit_interval_ms / 1000
        self._commit_task: asyncio.Task | None = None
        self._commit_lock = asyncio.Lock()
        self._fetch_failures = 0  # consecutive failed fetches: how long to wait before the next
        # per partition, the batch that failed to decode (its first offset) and how many times
        self._batch_failures: dict[TopicPartition, tuple[int, int]] = {}
        self._lifecycle = asyncio.Lock()  # rebalances and restarts, one at a time
        self._held: set[TopicPartition] = set()  # assigned, paused until started (exactly-once)
        # Assigned by the group's latest rebalance and not revoked since. Between a revoke and
        # the next assignment aiokafka still reports the old assignment and its positions; what
        # it returns then belongs to the old owner, and must not start a partition's tracking.
        self._assigned: set[TopicPartition] = set()
        # Counts rebalance callbacks (revokes and assignments): a position read across an await
        # is the assignment's that held when it was read, and is used only if none came between.
        self._rebalances = 0
        self._is_paused = False  # backpressure's pause(): resume() ends it
        self._sink: OffsetSink = sink or _ConsumerCommits(self._consumer)
        # Called with the revoked partitions before their final commit: the owner of in-flight
        # jobs stops them there, so nothing is published for a partition after it left.
        self.on_revoke: Callable[[set[TopicPartition]], Awaitable[None]] | None = None
        # Called with "fetch_error" (a fetch raised) or "undecodable_batch" (a batch did not decode).
        self.on_fetch_failure: Callable[[str], None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=_Rebalance(self))
        self._commit_task = asyncio.create_task(self._commit_periodically(), name="commit")

    async def stop(self) -> None:
        """Commit what is finished, then leave the group."""
        if self._commit_task is not None:
            self._commit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._commit_task
        await bounded(self.commit(), "the last commit")
        await bounded(self._consumer.stop(), "leaving the consumer group")

    async def fetch(self, max_records: int, timeout_ms: int = 200) -> list[tuple[ConsumerRecord, int]]:
        """Up to `max_records` new records, each with the generation of its partition's assignment
        (for done()); each is tracked as in flight until done(). A record this assignment has
        consumed already is not returned again.

        Never raises: a failed fetch (a broker error, a refused authorisation) is logged and gives
        no records; the next fetch, a little later, retries. A batch that cannot be decoded is
        fetched again, and after UNDECODABLE_BATCH_ATTEMPTS reads returned as one marker record
        at its last offset (lenient_records.undecodable_batch() says which batch and why), to be
        dead-lettered: consumption goes on past it.
        """
        try:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as e:
            self._count_failure("fetch_error")
            self._fetch_failures += 1
            delay = min(0.1 * 2**self._fetch_failures, 5.0)
            log.warning("fetching jobs failed (%s: %s); retrying in %.1fs", type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            return []
        self._fetch_failures = 0
        out = []
        for tp, records in batches.items():
            if tp not in self._assigned:
                continue  # revoked, not (yet) assigned again: its next assignment reads it again
            if self._sink.refetch_committed and self._tracker.generation(tp) is None:
                continue  # not started: it is consumed from its committed offset once it is
            for r in records:
                if (failure := undecodable_batch(r)) is not None and not self._gives_up_on(tp, failure):
                    # read the batch again; the records after it in this fetch come again after it
                    self._consumer.seek(tp, failure.first_offset)
                    break
                if (generation := self._tracker.track(tp, r.offset)) is not None:
                    out.append((r, generation))
        await self._skip_to_positions()
        return out

    async def _skip_to_positions(self) -> None:
        """Count what the consumer stepped over without a record (a trailing transaction marker,
        an aborted transaction) as done: the watermark, hence the commit, may reach the
        partition's end. Partitions not started (exactly-once) are left alone."""
        # not a partition revoked and not assigned again: its position is the old assignment's,
        # and skip_to() would start its next assignment past the jobs its committed offset redoes
        for tp in (self._consumer.assignment() & self._assigned) - self._held:
            generation = self._tracker.generation(tp)
            if self._sink.refetch_committed and generation is None:
                continue
            rebalances = self._rebalances
            try:
                # immediate when the position is known; unknown (an offset reset under way): next time.
                # wait_for runs it as a task (Python 3.11): a rebalance may start and end meanwhile.
                position = await asyncio.wait_for(self._consumer.position(tp), POSITION_WAIT_S)
            except (KafkaError, TimeoutError):
                continue
            if self._rebalances != rebalances:
                # The position may be the revoked assignment's, past the jobs its revoke aborted.
                # A partition without tracking (generation None before and after) would start its
                # next assignment there and take the re-read jobs for consumed: lost, not redone.
                return
            # restarted or held meanwhile: the position may be the old assignment's
            if tp not in self._held and self._tracker.generation(tp) == generation:
                self._tracker.skip_to(tp, position)

    def _gives_up_on(self, tp: TopicPartition, failure: UndecodableBatch) -> bool:
        """Whether a batch that failed to decode has failed often enough to be dead-lettered."""
        self._count_failure("undecodable_batch")
        first, attempts = self._batch_failures.get(tp, (failure.first_offset, 0))
        attempts = attempts + 1 if first == failure.first_offset else 1
        where = f"{_describe([tp])} offsets {failure.first_offset}-{failure.last_offset}"
        if attempts < UNDECODABLE_BATCH_ATTEMPTS:
            self._batch_failures[tp] = (failure.first_offset, attempts)
            log.warning("%s: the batch does not decode (%s); reading it again", where, failure.error)
            return False
        self._batch_failures.pop(tp, None)
        log.error("%s: the batch does not decode (%s); dead-lettered, going on past it", where, failure.error)
        return True

    def _count_failure(self, reason: str) -> None:
        if self.on_fetch_failure is not None:
            self.on_fetch_failure(reason)

    def pause(self) -> None:
        """Stop fetching from every assigned partition (fetch() still polls, keeping the membership)."""
        self._is_paused = True
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._is_paused = False
        self._consumer.resume(*(self._consumer.assignment() - self._held))

    @property
    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    def lag(self) -> int:
        """Records of the assigned partitions not yet done: the partition end minus its watermark."""
        total = 0
        for tp in self._consumer.assignment():
            end, mark = self._consumer.highwater(tp), self._tracker.watermark(tp)
            if end is not None and mark is not None:
                total += max(0, end - mark)
        return total

    def open_transactions(self) -> dict[TopicPartition, int]:
        """Per assigned partition, the records between its last stable offset and its high
        watermark, as of the last fetch: what an open producer transaction holds back from this
        (read_committed) consumer, for up to the broker's transaction.max.timeout.ms."""
        return {tp: max(0, end - stable) for tp, (end, stable) in self._ends().items()}

    def last_stable_offsets(self) -> dict[TopicPartition, int]:
        """Per assigned partition, its last stable offset as of the last fetch."""
        return {tp: stable for tp, (_, stable) in self._ends().items()}

    def _ends(self) -> dict[TopicPartition, tuple[int, int]]:
        ends = {}
        for tp in self._consumer.assignment():
            end, stable = self._consumer.highwater(tp), self._consumer.last_stable_offset(tp)
            if end is not None and stable is not None and stable >= 0:  # known once fetched
                ends[tp] = (end, stable)
        return ends

    def done(self, record: ConsumerRecord, generation: int) -> None:
        """The record's outcome is acknowledged by the broker (at-least-once) or staged (exactly-once):
        its offset may be committed, if its partition is still in the assignment it was fetched in."""
        self._tracker.done(TopicPartition(record.topic, record.partition), record.offset, generation)

    def is_current(self, record: ConsumerRecord, generation: int) -> bool:
        """The record's partition is still in the assignment the record was consumed under."""
        return self._tracker.generation(TopicPartition(record.topic, record.partition)) == generation

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            offsets = self._tracker.committable()
            if partitions is not None:
                offsets = {tp: o for tp, o in offsets.items() if tp in partitions}
            if not offsets:
                return
            committed = await self._sink.commit(offsets)
            self._tracker.mark_committed(committed)
            if committed:
                log.debug("committed %s", _describe(committed))

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval)
            try:
                await self.commit()
                await self._restart_due()
            except Exception:  # a bug, not the broker (sinks handle KafkaError): commits must go on
                log.exception("committing offsets failed; retrying in %.1fs", self._commit_interval)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._assigned -= revoked  # now, before any await: fetch() tracks none of them from here
        self._rebalances += 1
        async with self._lifecycle:
            if self.on_revoke is not None:
                await self.on_revoke(revoked)
            await self.commit(revoked)  # what finished before; the aborted jobs stay uncommitted
            self._tracker.forget(revoked)
            for tp in revoked:
                self._batch_failures.pop(tp, None)
            self._held -= revoked
            await self._sink.revoked(revoked)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        self._rebalances += 1
        if self._sink.refetch_committed:
            self._hold(assigned)  # now, before any await: not a record until they are started
            async with self._lifecycle:
                await self._start(assigned)

    async def _restart_due(self) -> None:
        """Start again partitions held back or given up by the sink: abort their jobs, fence, re-read."""
        async with self._lifecycle:
            partitions = (self._held | self._sink.restarts()) & self.assignment
            if not partitions:
                return
            log.info("restarting %s from the committed offsets", _describe(partitions))
            self._hold(partitions)
            if self.on_revoke is not None:
                await self.on_revoke(partitions)
            self._tracker.forget(partitions)
            await self._sink.revoked(partitions)
            await self._start(partitions)

    async def _start(self, partitions: set[TopicPartition]) -> None:
        """Hold the partitions until the sink has fenced their previous owner, then consume each
        from its committed offset, read now. Those that fail stay held; the commit loop retries."""
        self._hold(partitions)
        committed = {}
        if started := await self._sink.assigned(partitions):
            try:
                committed = await self._read_committed(started)
            except KafkaError as e:
                log.warning("%s: reading the committed offsets failed (%s); retrying", _describe(started), e)
        offsets = self._sink.starts_at({tp: o for tp, o in committed.items() if tp in self.assignment})
        for tp, offset in offsets.items():
            self._consumer.seek(tp, offset)
            self._tracker.start(tp, offset)
        self._held -= set(offsets)
        if not self._is_paused:
            self._consumer.resume(*offsets)
        if offsets:
            log.info("consuming %s", _describe(offsets))

    def _hold(self, partitions: set[TopicPartition]) -> None:
        self._held |= partitions
        self._consumer.pause(*partitions)

    async def _read_committed(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition's committed offset says to go on, read stable: never from before a
        transaction of the previous owner whose commit is still settling (service/stable_offsets.py)."""
        committed = await committed_stable(
            self._consumer, self._group_id, sorted(partitions), COMMITTED_READ_TIMEOUT_S
        )
        if never := [tp for tp, offset in committed.items() if offset is None]:
            # nothing committed yet: auto_offset_reset="earliest"
            committed.update(await self._consumer.beginning_offsets(never))
        return committed


class _ConsumerCommits:
    """At-least-once: the consumer group's own offset commit."""

    refetch_committed = False

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer

    async def commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        try:
            await self._consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        except (CommitFailedError, KafkaError) as e:
            # Not fatal: the next commit covers these offsets, or the next owner redoes the jobs.
            log.warning("commit of %s failed: %s", _describe(offsets), e)
            return {}
        return offsets

    async def assigned(self, partitions: set[TopicPartition]) -> set[TopicPartition]:
        return partitions

    def starts_at(self, committed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        return committed

    def restarts(self) -> set[TopicPartition]:
        return set()

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        pass


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: JobConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            log.info("partitions revoked: %s", _describe(revoked))
            await self._consumer._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            log.info("partitions assigned: %s", _describe(assigned))
            await self._consumer._on_assigned(set(assigned))


def _describe(partitions) -> str:
    items = partitions.items() if isinstance(partitions, dict) else ((tp, None) for tp in partitions)
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + ("" if o is None else f"@{o}") for tp, o in sorted(items)
    )
