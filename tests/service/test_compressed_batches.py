"""Compressed batches on the real broker: every codec a Kafka producer may use is consumed, Sluice
compresses what it produces when told to, and a batch that cannot be decoded (a codec it lacks,
a compression bomb) is dead-lettered with its offsets while the partition goes on."""

from __future__ import annotations

import functools
import json
import tracemalloc

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from schemas.codec import decode_result
from service import lenient_records
from service.decompress import CODEC_ZSTD, DecompressionRefused
from tests.service.hostile import RawRecord, gzip_bomb, post_batch, post_raw
from tests.service.test_hostile_records import job, wait_for_commits

pytestmark = pytest.mark.kafka

CODECS = ["gzip", "snappy", "lz4", "zstd"]


async def test_jobs_in_batches_of_every_codec_are_answered_and_results_compressed(
    kafka, service_config, run_service
):
    c = msgspec.structs.replace(service_config, compression_type="zstd")
    jobs_topic = c.jobs_topics[0]
    for codec in CODECS:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, compression_type=codec, linger_ms=50)
        await producer.start()
        try:
            sent = [
                await producer.send(jobs_topic, key=f"{codec}-{i}".encode(), value=job(f"{codec}-{i}"))
                for i in range(3)
            ]
            await producer.flush()
            assert all(f.done() and not f.exception() for f in sent)
        finally:
            await producer.stop()
    async with run_service(c) as service:
        results = await kafka.read(c.results_topic, 3 * len(CODECS))
        await wait_for_commits(kafka, c.group_id, jobs_topic)
        assert service.publisher._producer._compression_type == "zstd"
    lines = {r.key.decode(): decode_result(r.value) for r in results}
    assert sorted(lines) == sorted(f"{codec}-{i}" for codec in CODECS for i in range(3))
    assert not any(line.is_error for line in lines.values())


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_batch_that_does_not_decode_is_dead_lettered_by_its_offsets_and_the_partition_goes_on(
    kafka, service_config, run_service, monkeypatch, delivery
):
    c = msgspec.structs.replace(service_config, delivery=delivery)
    jobs_topic = c.jobs_topics[0]
    real = lenient_records.decompress

    def without_zstd(codec, data, limit):  # as if this consumer lacked the codec
        if codec == CODEC_ZSTD:
            raise DecompressionRefused("zstd: this consumer has no zstd codec")
        return real(codec, data, limit)

    monkeypatch.setattr(lenient_records, "decompress", without_zstd)
    before = [RawRecord(job(f"before-{i}"), key=f"before-{i}".encode()) for i in range(2)]
    lost = [RawRecord(job(f"zstd-{i}"), key=f"zstd-{i}".encode()) for i in range(3)]
    after = [RawRecord(job("after"), key=b"after")]
    await post_raw(kafka.bootstrap, jobs_topic, 0, before, compression=1)  # offsets 0-1, gzip
    await post_raw(kafka.bootstrap, jobs_topic, 0, lost, compression=CODEC_ZSTD)  # offsets 2-4
    await post_raw(kafka.bootstrap, jobs_topic, 0, after)  # offset 5
    async with run_service(c) as service:
        results = await kafka.read(c.results_topic, 3)
        (dead,) = await kafka.read(c.dlq_topic, 1)
        await wait_for_commits(kafka, c.group_id, jobs_topic)
        metrics = service.metrics.render().decode()

    assert sorted(r.key for r in results) == [b"after", b"before-0", b"before-1"]
    headers = dict(dead.headers)
    assert headers["sluice-error-code"] == b"undecodable_batch"
    assert headers["sluice-source-partition"] == b"0"
    assert headers["sluice-source-offsets"] == b"2-4"
    assert b"this consumer has no zstd codec" in headers["sluice-error-message"]
    assert dead.key is None and dead.value == b""
    assert 'sluice_fetch_failures_total{reason="undecodable_batch"} 3.0' in metrics
    assert (await kafka.committed(c.group_id, jobs_topic))[0] == 6


@functools.cache
def _gigabyte_bomb() -> bytes:
    return gzip_bomb(1 << 30)  # about 1 MB that expands to 1 GiB


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_a_gzip_bomb_is_refused_unread_with_bounded_memory(
    kafka, service_config, run_service, delivery
):
    c = msgspec.structs.replace(service_config, delivery=delivery)
    jobs_topic = c.jobs_topics[0]
    bomb = _gigabyte_bomb()
    assert len(bomb) < 1_048_576
    async with run_service(c) as service:
        tracemalloc.start()
        try:
            await post_batch(kafka.bootstrap, jobs_topic, 0, bomb)
            await kafka.post(jobs_topic, [(b"canary", job("canary"), [])])
            (dead,) = await kafka.read(c.dlq_topic, 1)
            (canary,) = await kafka.read(c.results_topic, 1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await wait_for_commits(kafka, c.group_id, jobs_topic)
        assert not service.engine_failure
    headers = dict(dead.headers)
    assert headers["sluice-error-code"] == b"undecodable_batch"
    message = headers["sluice-error-message"].decode()
    assert f"decompresses to more than {c.max_batch_bytes} bytes" in message
    assert json.loads(canary.value)["custom_id"] == "canary"
    # each of the three reads of the bomb held at most max_batch_bytes and its growth step
    assert peak < 3 * c.max_batch_bytes, f"peak {peak} bytes"
