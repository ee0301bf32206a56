"""Publishing faults that the local broker cannot stage (authorisation, failed sends inside a
transaction, hung commits), with small doubles of the Kafka clients: no broker needed."""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, TopicAuthorizationFailedError
from aiokafka.structs import ConsumerRecord

from schemas.batch import BatchResponseLine
from schemas.codec import JSON, decode_result
from service import shutdown
from service.consumer import JobConsumer
from service.delivery import OutcomeDelivery
from service.jobs import Outcome
from service.publisher import PublishRefused
from service.transactions import OutRecord, TransactionalDelivery

RECORD = ConsumerRecord("jobs", 0, 7, 0, 0, b"job-1", b'{"custom_id": "job-1"}', None, 5, 20, ())


class _Publisher:
    """ResultPublisher's interface; refuses what `refuse` names: {topic: error}."""

    def __init__(self, refuse: dict[str, Exception], refuse_check: dict[str, Exception] | None = None):
        self.refuse = refuse
        self.refuse_check = refuse_check or {}
        self.published: list[tuple[str, bytes | None, bytes, list]] = []

    async def check_topic(self, topic):
        if topic in self.refuse_check:
            raise PublishRefused(topic, self.refuse_check[topic])

    async def publish(self, topic, key, value, headers, refusable=False):
        if topic in self.refuse:
            raise PublishRefused(topic, self.refuse[topic])
        self.published.append((topic, key, value, headers))


def _outcome(reply_to: str) -> Outcome:
    """A job's successful outcome (its response left out: only its routing matters here)."""
    return Outcome(BatchResponseLine(id="batch_req_1", custom_id="job-1", response=None), JSON, reply_to)


@pytest.mark.parametrize(
    ("refuse", "refuse_check"),
    [
        ({"results.run-1": TopicAuthorizationFailedError("results.run-1")}, None),
        ({}, {"results.run-1": TopicAuthorizationFailedError("results.run-1")}),
    ],
)
async def test_a_reply_topic_the_broker_refuses_gives_an_error_result_on_the_results_topic(
    refuse, refuse_check
):
    publisher = _Publisher(refuse, refuse_check)
    delivery = OutcomeDelivery(publisher, None, "results", "dlq", max_result_bytes=100_000)
    outcome = await delivery.deliver(RECORD, _outcome("results.run-1"), [])
    assert outcome.result.failure.code == "invalid_reply_to" and outcome.reply_to is None
    assert "TopicAuthorizationFailedError" in outcome.result.failure.message
    (result_topic, key, value, _), (dead_topic, dead_key, dead_value, headers) = publisher.published
    assert (result_topic, key, decode_result(value).custom_id) == ("results", b"job-1", "job-1")
    assert (dead_topic, dead_key, dead_value) == ("dlq", b"job-1", RECORD.value)
    assert dict(headers)["sluice-error-code"] == b"invalid_reply_to"


async def test_a_result_the_broker_refuses_as_too_large_becomes_a_small_error_result():
    publisher = _Publisher({"results.big": MessageSizeTooLargeError()})
    delivery = OutcomeDelivery(publisher, None, "results", "dlq", max_result_bytes=100_000)
    outcome = await delivery.deliver(RECORD, _outcome("results.big"), [])
    assert outcome.result.failure.code == "result_too_large"
    assert [topic for topic, *_ in publisher.published] == ["results", "dlq"]


class _Producer:
    """A transactional AIOKafkaProducer's interface: every send's delivery fails."""

    committed: ClassVar[list[dict]] = []

    def __init__(self, **options):
        self.aborted = False

    async def start(self):
        pass

    async def stop(self):
        pass

    @contextlib.asynccontextmanager
    async def transaction(self):
        try:
            yield
        except BaseException:
            self.aborted = True
            raise

    async def send(self, topic, value=None, key=None, headers=None):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(KafkaConnectionError("delivery failed"))
        return future

    async def send_offsets_to_transaction(self, offsets, group_id):
        _Producer.committed.append(offsets)


async def test_exactly_once_commits_no_offsets_and_restarts_the_partition_when_a_send_of_the_transaction_fails():
    delivery = TransactionalDelivery("kafka:9092", "group", "sluice", "", producer_factory=_Producer)
    tp = TopicPartition("jobs", 0)
    await delivery.assigned({tp})
    delivery.stage(tp, 0, [OutRecord("results", b"k", b"v", [])])
    _Producer.committed.clear()
    assert await delivery.commit({tp: 1}) == {}
    assert _Producer.committed == []
    # Not resent: the partition restarts from its committed offset, which redoes the job (its
    # producer may be fenced; see test_partition_handover.py).
    assert delivery.num_staged() == 0
    assert tp in delivery.restarts()


class _Sink:
    refetch_committed = False

    def __init__(self, hang: bool = False):
        self.calls = 0
        self.hang = hang

    async def commit(self, offsets):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.calls == 1:
            raise RuntimeError("a commit that fails unexpectedly")
        return offsets


def _consumer(sink: _Sink) -> JobConsumer:
    consumer = JobConsumer("127.0.0.1:1", ["jobs"], "group", "sluice", commit_interval_ms=10, sink=sink)
    consumer._tracker.track(TopicPartition("jobs", 0), 0)
    consumer._tracker.done(TopicPartition("jobs", 0), 0)
    return consumer


async def test_the_periodic_commit_survives_a_failing_commit():
    sink = _Sink()
    consumer = _consumer(sink)
    task = asyncio.create_task(consumer._commit_periodically())
    await asyncio.sleep(0.2)
    task.cancel()
    assert sink.calls == 2  # the first failed, the second committed; nothing left to commit since


async def test_shutdown_ends_when_the_last_commit_hangs(monkeypatch):
    monkeypatch.setattr(shutdown, "CLOSE_TIMEOUT_S", 0.2)
    consumer = _consumer(_Sink(hang=True))
    await asyncio.wait_for(consumer.stop(), timeout=5)
