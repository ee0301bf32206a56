"""JobConsumer: the consumer group on the jobs topics, and the commits of finished work.

Auto-commit is off. An offset is committed only once every job below it is done (OffsetTracker);
commits run every `commit_interval_ms`, when partitions are revoked, and at shutdown. Who
commits is an OffsetSink: the consumer itself (at-least-once: "done" means the result is
acknowledged by the broker) or a transactional producer (exactly-once: "done" means the result
is staged, and the sink publishes it and commits its offset in one transaction).
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
from service.offsets import OffsetTracker
from service.shutdown import bounded

log = logging.getLogger(__name__)


class OffsetSink(Protocol):
    """Where committable offsets go; returns the offsets it committed."""

    # True when the sink's assigned() may change what is committed (fencing a previous owner's
    # transaction): the consumer then starts the partitions from a fresh read of the commits.
    refetch_committed: bool

    async def commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]: ...

    async def assigned(self, partitions: set[TopicPartition]) -> None: ...

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
    ):
        lenient_records.install()  # a batch with a non-UTF-8 header key still reads
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
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._commit_interval = commit_interval_ms / 1000
        self._commit_task: asyncio.Task | None = None
        self._commit_lock = asyncio.Lock()
        self._fetch_failures = 0  # consecutive failed fetches: how long to wait before the next
        self._sink: OffsetSink = sink or _ConsumerCommits(self._consumer)
        # Called with the revoked partitions before their final commit: the owner of in-flight
        # jobs stops them there, so nothing is published for a partition after it left.
        self.on_revoke: Callable[[set[TopicPartition]], Awaitable[None]] | None = None

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

    async def fetch(self, max_records: int, timeout_ms: int = 200) -> list[ConsumerRecord]:
        """Up to `max_records` new records; each is tracked as in flight until done().

        Never raises: a failed fetch (a broker error, a refused authorisation, a record the
        client cannot parse) is logged and gives no records; the next fetch, a little later, retries.
        """
        try:
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except Exception as e:
            self._fetch_failures += 1
            delay = min(0.1 * 2**self._fetch_failures, 5.0)
            log.warning("fetching jobs failed (%s: %s); retrying in %.1fs", type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            return []
        self._fetch_failures = 0
        records = [r for rs in batches.values() for r in rs]
        for r in records:
            self._tracker.track(TopicPartition(r.topic, r.partition), r.offset)
        return records

    def pause(self) -> None:
        """Stop fetching from every assigned partition (fetch() still polls, keeping the membership)."""
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._consumer.resume(*self._consumer.assignment())

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

    def done(self, record: ConsumerRecord) -> None:
        """The record's outcome is acknowledged by the broker: its offset may be committed."""
        self._tracker.done(TopicPartition(record.topic, record.partition), record.offset)

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
            except Exception:  # the next interval retries: a commit task that died would commit nothing again
                log.exception("committing offsets failed; retrying in %.1fs", self._commit_interval)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.on_revoke is not None:
            await self.on_revoke(revoked)
        await self.commit(revoked)  # what finished before; the aborted jobs stay uncommitted
        self._tracker.forget(revoked)
        await self._sink.revoked(revoked)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._sink.assigned(assigned)
        if self._sink.refetch_committed:
            await self._consumer.seek_to_committed(*assigned)


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

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        pass

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
