"""OffsetTracker: which offset of each partition is safe to commit.

At-least-once: a partition's committed offset never passes a job whose result the broker has
not acknowledged. Jobs finish out of order, so the committable offset is the partition's
contiguous watermark: the lowest offset still in flight, or the consumer's position (one past
the last consumed offset, or past the transaction markers after it: skip_to) when nothing is in
flight.

Each assignment of a partition is a generation of its own: track() says which one a record was
consumed under, and done() with an older generation is ignored. A job consumed before its
partition was revoked and handed back to this process must not move the new assignment's
watermark, nor may a record consumed twice in one assignment (a seek back) be tracked twice.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")  # a partition key: aiokafka's TopicPartition in the service, anything hashable in tests


@dataclass(slots=True)
class _PartitionState:
    next_offset: int  # one past the highest offset consumed
    generation: int  # which assignment of the partition this is
    in_flight: list[int] = field(default_factory=list)  # min-heap of offsets not yet done
    done: set[int] = field(default_factory=set)  # done offsets still above the heap's minimum
    committed: int | None = None  # what the last commit() reported


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._partitions: dict[P, _PartitionState] = {}
        self._generations = itertools.count(1)

    def start(self, partition: P, offset: int) -> None:
        """A new assignment of `partition`, consumed from `offset` (its committed offset) on."""
        self._partitions[partition] = _PartitionState(offset, next(self._generations), committed=offset)

    def track(self, partition: P, offset: int) -> int | None:
        """A record was consumed and its job is now in flight: the generation it belongs to, or
        None for a record this assignment has already consumed (or that lies below its start)."""
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _PartitionState(offset, next(self._generations))
        elif offset < state.next_offset:
            return None
        heapq.heappush(state.in_flight, offset)
        state.next_offset = offset + 1
        return state.generation

    def skip_to(self, partition: P, position: int) -> None:
        """The consumer's position on the partition reached `position`: every offset below it
        was consumed as a record (tracked) or holds none to consume (a transaction's commit or
        abort marker, the records of an aborted transaction). Once the jobs in flight are done
        the watermark reaches `position`, the partition's end after a trailing transaction
        marker, so the committed offset does too (consumer lag 0)."""
        state = self._partitions.get(partition)
        if state is None:
            self._partitions[partition] = _PartitionState(position, next(self._generations))
        elif position > state.next_offset:
            state.next_offset = position

    def generation(self, partition: P) -> int | None:
        """The partition's current assignment; None while it is not assigned."""
        state = self._partitions.get(partition)
        return None if state is None else state.generation

    def done(self, partition: P, offset: int, generation: int | None = None) -> None:
        """The record's outcome (result or error result) is acknowledged by the broker.

        `generation`: the one track() returned; a job of an earlier assignment changes nothing."""
        state = self._partitions.get(partition)
        if state is None or (generation is not None and generation != state.generation):
            return  # the partition was revoked meanwhile; its owner since redoes the job
        state.done.add(offset)
        while state.in_flight and state.in_flight[0] in state.done:
            state.done.discard(heapq.heappop(state.in_flight))

    def watermark(self, partition: P) -> int | None:
        state = self._partitions.get(partition)
        if state is None:
            return None
        return state.in_flight[0] if state.in_flight else state.next_offset

    def committable(self) -> dict[P, int]:
        """Partitions whose watermark moved since the last mark_committed()."""
        return {
            partition: mark
            for partition, state in self._partitions.items()
            if (mark := self.watermark(partition)) is not None and mark != state.committed
        }

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for partition, offset in offsets.items():
            if (state := self._partitions.get(partition)) is not None:
                state.committed = offset

    def forget(self, partitions) -> None:
        """Drop revoked partitions: their unfinished jobs are redone by the next owner."""
        for partition in partitions:
            self._partitions.pop(partition, None)
