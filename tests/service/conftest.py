"""Kafka helpers for the service tests: post jobs, collect results, run a Service in-process."""

from __future__ import annotations

import contextlib
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine import EngineConfig, LLMEngine
from service.app import Service
from service.config import ServiceConfig
from tests.service.running import running


class KafkaClient:
    """Produces jobs and reads topics from the beginning, as a user's own client would."""

    def __init__(self, bootstrap: str, security: dict | None = None) -> None:
        self.bootstrap = bootstrap
        self.security = security or {}  # SASL/TLS keyword arguments (service.kafka_security.client_options)

    async def post(
        self, topic: str, records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]
    ) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **self.security, acks="all")
        await producer.start()
        try:
            for key, value, headers in records:
                await producer.send(topic, key=key, value=value, headers=headers)
            await producer.flush()
        finally:
            await producer.stop()

    async def read(self, topic: str, count: int, timeout: float = 60.0) -> list:
        """The first `count` records of `topic` (fails the test if they do not arrive in time)."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            **self.security,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        records: list = []
        deadline = time.monotonic() + timeout
        try:
            while len(records) < count and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=300)).values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        assert len(records) >= count, f"{topic}: got {len(records)} records of {count} within {timeout}s"
        return records

    async def read_all(self, topic: str, quiet: float = 1.5, isolation_level="read_uncommitted") -> list:
        """Every record now in `topic`: reads until nothing new arrives for `quiet` seconds."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            **self.security,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
        )
        await consumer.start()
        records: list = []
        try:
            while batches := await consumer.getmany(timeout_ms=int(quiet * 1000)):
                for batch in batches.values():
                    records.extend(batch)
        finally:
            await consumer.stop()
        return records

    async def committed(self, group_id: str, topic: str) -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, **self.security, group_id=group_id, enable_auto_commit=False
        )
        await consumer.start()
        try:
            partitions = await _partitions(consumer, topic)
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
        finally:
            await consumer.stop()

    async def topic_names(self) -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.security)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    async def end_offsets(self, topic: str) -> dict[int, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, **self.security)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
            return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        finally:
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The topic's partitions. consumer.topics() fills a metadata copy of its own, not the one
    partitions_for_topic() reads, so this asks the client for the topic's metadata itself."""
    return set(await consumer._client._wait_on_metadata(topic))


@pytest.fixture
def kafka(kafka_bootstrap) -> KafkaClient:
    return KafkaClient(kafka_bootstrap)


@pytest.fixture
def service_config(kafka_bootstrap, topic_prefix, tiny_checkpoint) -> ServiceConfig:
    return ServiceConfig(
        kafka_bootstrap=kafka_bootstrap,
        jobs_topics=[f"{topic_prefix}.jobs"],
        results_topic=f"{topic_prefix}.results",
        dlq_topic=f"{topic_prefix}.dlq",
        traces_topic=f"{topic_prefix}.traces",
        group_id=f"{topic_prefix}-group",
        topic_partitions=2,
        commit_interval_ms=100,
        engine=EngineConfig(dtype="float32", model=str(tiny_checkpoint)),
        model_name="tiny",
        default_max_tokens=8,
        http_host="127.0.0.1",
        http_port=0,  # several services may run in one test
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=256))


@contextlib.asynccontextmanager
async def running_service(config: ServiceConfig, engine: LLMEngine):
    """A Service consuming in the background; stopped (drained and committed) on exit."""
    async with running(Service(config, engine)) as service:
        yield service


@pytest.fixture
def run_service(tiny_engine):
    """`async with run_service(config) as service:` runs a Service on the shared tiny engine
    (or on `engine=`: two services in one test each need their own)."""
    return lambda config, engine=None: running_service(config, engine or tiny_engine)
