"""TransactionalDelivery: exactly-once results, each partition's in one Kafka transaction.

A finished job's records (its result, and a dead letter for a failed job) are staged, not
sent. A commit takes, per input partition, every staged record below the partition's
watermark and sends them together with the new consumer offset in one transaction
(`send_offsets_to_transaction`): a reader with isolation_level=read_committed sees a job's
result exactly when the job's offset is committed, and never twice.

aiokafka predates KIP-447 (fencing by consumer-group generation), so zombies are fenced the
older way: one transactional id per input partition, `<prefix>.<topic>.<partition>`. Whoever
is assigned a partition starts a producer with its id, which fences the previous owner (its
open transaction is aborted, its later commits fail), then re-reads the committed offset.

Transactions cost a round trip or two each, so they run per commit interval, not per job;
results reach read_committed readers up to one interval later than at-least-once results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from service.publisher import Headers

log = logging.getLogger(__name__)


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
    ) -> None:
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._client_id = client_id
        self._prefix = transactional_id_prefix or group_id
        self._new_producer = producer_factory
        self._security = security or {}
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        # One start at a time per partition: two producers with one transactional id fence each other.
        self._starting: dict[TopicPartition, asyncio.Lock] = {}
        # Fenced partitions: a newer owner holds them; nothing more is staged or committed for them
        # until they are assigned here again (the group revokes them at the next rebalance).
        self._lost: set[TopicPartition] = set()
        self._staged: dict[TopicPartition, dict[int, list[OutRecord]]] = {}
        self.num_transactions = 0

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self._prefix}.{tp.topic}.{tp.partition}"

    def stage(self, tp: TopicPartition, offset: int, records: list[OutRecord]) -> None:
        """A job's records, to be published with the commit that passes its offset."""
        if tp not in self._lost:
            self._staged.setdefault(tp, {})[offset] = records

    def num_staged(self) -> int:
        return sum(len(s) for s in self._staged.values())

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """Start each partition's producer: this fences the partition's previous owner."""
        self._lost -= partitions
        await asyncio.gather(*(self._producer(tp) for tp in partitions))

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """The partitions' last commit is done: drop what is left (the next owner redoes it)."""
        self._lost -= partitions
        for tp in partitions:
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
        if tp in self._lost:
            return False  # its offsets are the newer owner's to commit
        staged = self._staged.get(tp, {})
        offsets = sorted(o for o in staged if o < offset)
        records = [r for o in offsets for r in staged[o]]
        try:
            producer = await self._producer(tp)
            # Commits on success; on an error aborts, unless the producer is fenced (fatal).
            async with producer.transaction():
                sent = [
                    await producer.send(r.topic, value=r.value, key=r.key, headers=r.headers) for r in records
                ]
                await asyncio.gather(*sent)  # a record the broker refused aborts the transaction
                await producer.send_offsets_to_transaction({tp: offset}, self._group_id)
        except ProducerFenced:
            # Another instance owns the partition now and redoes these jobs.
            log.warning("%s: fenced by a newer owner; %d staged results dropped", _name(tp), len(offsets))
            self._lost.add(tp)
            self._staged.pop(tp, None)
            await self._close(tp)
            return False
        except KafkaError as e:
            # The transaction is aborted (or the producer unusable): keep the records, retry next time.
            log.warning("%s: transaction failed (%s); retrying at the next commit", _name(tp), e)
            await self._close(tp)
            return False
        for o in offsets:
            del staged[o]
        self.num_transactions += 1
        return True

    async def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        async with self._starting.setdefault(tp, asyncio.Lock()):
            return await self._start_producer(tp)

    async def _start_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is None:
            producer = self._new_producer(
                bootstrap_servers=self._bootstrap,
                client_id=f"{self._client_id}-txn",
                transactional_id=self.transactional_id(tp),
                enable_idempotence=True,
                acks="all",
                **self._security,
            )
            await producer.start()  # InitProducerId: fences older producers with this id
            self._producers[tp] = producer
        return producer

    async def _close(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as e:
                log.debug("%s: closing the producer: %s", _name(tp), e)


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"
