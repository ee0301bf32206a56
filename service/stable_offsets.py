"""committed_stable(): a consumer group's committed offsets, never older than the last one committed.

Exactly-once commits each partition's offset inside its results' transaction
(send_offsets_to_transaction), and a partition's next owner starts from the committed offset it
reads. An ordinary read (OffsetFetch up to v6, all aiokafka 0.14 sends) may answer with an
offset from before the last commit, in two ways:
- a transaction whose commit marker has not reached the group coordinator yet: its offset is
  still pending, and the read gives the one before it;
- Kafka's group coordinator (the KIP-848 runtime, Kafka 4) answers an ordinary read from its
  state as of the offsets topic's high watermark; a coordinator newly elected after a broker's
  death may not have that high watermark up to the last commit of the one before it yet.
Either way the next owner redoes jobs whose results are already committed, publishes them a
second time, and commits an offset below the last one (the three-broker chaos soak: jobs[3]'s
committed offset went from 162 back to 118 after the group coordinator's kill, 111 results
twice). KIP-447's require_stable (OffsetFetch v7) closes both: the coordinator answers from all
of its offsets records, waiting for them to be committed (a write operation in Kafka 4's
GroupCoordinatorService.fetchOffsets), and with UNSTABLE_OFFSET_COMMIT while a transactional
commit is pending, when the reader asks again. Kafka's Java consumer always asks so under
read_committed. aiokafka stops at v3, so the request is defined here on aiokafka's protocol types
and sent through the consumer's own client to the group coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    NodeNotReadyError,
    NotCoordinatorError,
    RequestTimedOutError,
    for_code,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)

log = logging.getLogger(__name__)

UNSTABLE_OFFSET_COMMIT = 88  # Kafka's error code: a transactional offset commit is pending
RETRY_BACKOFF_S = 0.1
# What the consumer's own coordinator errors mean: find the coordinator again, then ask again.
_COORDINATOR_MOVED = (
    NotCoordinatorError,
    CoordinatorNotAvailableError,
    NodeNotReadyError,
    KafkaConnectionError,
)
_RETRY_SOON = (CoordinatorLoadInProgressError, RequestTimedOutError)


class OffsetFetchResponse_v7(Response):
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):
    API_KEY = 9
    API_VERSION = 7
    FLEXIBLE_VERSION = True
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class StableOffsetFetchRequest(Request[OffsetFetchRequest_v7]):
    """OffsetFetch with require_stable, v7 only: a broker without it (before Kafka 2.5) refuses."""

    API_KEY = 9

    def __init__(self, group_id: str, partitions: list[TopicPartition]) -> None:
        self._group_id = group_id
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        self._topics = sorted(by_topic.items())

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        return request_struct_class(self._group_id, [(t, ps, {}) for t, ps in self._topics], True, {})


class UnstableOffsets(KafkaError):
    """Transactional offset commits stayed pending for the whole wait."""

    retriable = True


async def committed_stable(
    consumer: AIOKafkaConsumer, group_id: str, partitions: list[TopicPartition], timeout_s: float
) -> dict[TopicPartition, int | None]:
    """Each partition's committed offset (None: nothing committed), asked of the group
    coordinator with require_stable until no transactional commit is pending for any of them.
    Raises a KafkaError when that takes longer than `timeout_s` or the broker refuses."""
    coordinator = consumer._coordinator  # aiokafka has no public way to reach the group coordinator
    client = consumer._client
    deadline = time.monotonic() + timeout_s
    last_error: KafkaError | None = None
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(
                coordinator.ensure_coordinator_known(), max(0.0, deadline - time.monotonic())
            )
            node = coordinator.coordinator_id
            response = await client.send(node, StableOffsetFetchRequest(group_id, partitions))
            return _offsets(response, partitions)
        except _COORDINATOR_MOVED as e:
            last_error = e
            coordinator.coordinator_dead()
        except (*_RETRY_SOON, UnstableOffsets) as e:
            last_error = e
        except TimeoutError:
            break
        await asyncio.sleep(RETRY_BACKOFF_S)
    raise last_error or RequestTimedOutError(f"no committed offsets within {timeout_s:.0f}s")


def _offsets(
    response: OffsetFetchResponse_v7, partitions: list[TopicPartition]
) -> dict[TopicPartition, int | None]:
    if response.error_code:
        raise for_code(response.error_code)(f"OffsetFetch v7: group error {response.error_code}")
    offsets: dict[TopicPartition, int | None] = {}
    unstable = []
    for name, topic_partitions, _ in response.topics:
        for index, offset, _epoch, _metadata, error_code, _ in topic_partitions:
            tp = TopicPartition(name, index)
            if error_code == UNSTABLE_OFFSET_COMMIT:
                unstable.append(tp)
            elif error_code:
                raise for_code(error_code)(f"OffsetFetch v7 for {name}[{index}]: error {error_code}")
            else:
                offsets[tp] = None if offset < 0 else offset
    if unstable:
        log.info("a transactional offset commit is pending for %s; reading again", unstable)
        raise UnstableOffsets(f"pending transactional offset commits: {unstable}")
    if missing := set(partitions) - set(offsets):
        raise KafkaError(f"OffsetFetch v7 answered without {sorted(missing)}")
    return offsets
