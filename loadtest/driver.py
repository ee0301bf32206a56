"""Load against a running Sluice through Kafka: open loop (Poisson arrivals at a rate) or closed
loop (a fixed number of jobs in flight), recording each job's timings from its result.

A job is a /v1/completions line with prompt token ids, greedy, EOS ignored: it produces exactly
`max_tokens` tokens, so the same jobs can be replayed on the engine offline (offline.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from loadtest.scrape import MetricsSample, sample_metrics


@dataclass(slots=True)
class Target:
    """Where the service under test is: its Kafka topics and its /metrics URL."""

    bootstrap: str
    jobs_topic: str
    results_topic: str
    metrics_url: str | None = None  # batch size and KV use over time; None: not sampled
    security: dict = field(default_factory=dict)  # service.kafka_security.client_options


@dataclass(slots=True)
class JobShape:
    """The distribution jobs are drawn from (uniform lengths, fixed seed)."""

    vocab_size: int
    prompt_tokens: tuple[int, int] = (32, 256)
    output_tokens: tuple[int, int] = (16, 64)
    seed: int = 0


@dataclass(slots=True)
class Job:
    custom_id: str
    prompt: list[int]
    max_tokens: int
    sent: float | None = None  # the job record's timestamp (s)
    finished: float | None = None  # the result record's timestamp (s)
    error: str | None = None  # the result's error code
    output_tokens: int = 0
    queue_s: float | None = None  # body.sluice timings of the result
    ttft_s: float | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.finished is None or self.sent is None else self.finished - self.sent


@dataclass(slots=True)
class LoadRun:
    mode: str  # "open loop, R jobs/s" or "closed loop, C in flight"
    duration_s: float
    jobs: list[Job]
    samples: list[MetricsSample]
    offline_tokens_per_s: float | None = None  # the same jobs on the engine offline (offline.py)


class _JobSource:
    def __init__(self, shape: JobShape) -> None:
        self._shape, self._rng = shape, random.Random(shape.seed)
        self._prefix = f"load-{uuid.uuid4().hex[:8]}"
        self.jobs: list[Job] = []

    def next(self) -> Job:
        s, rng = self._shape, self._rng
        prompt = [1] + [rng.randrange(4, s.vocab_size) for _ in range(rng.randint(*s.prompt_tokens) - 1)]
        job = Job(f"{self._prefix}-{len(self.jobs)}", prompt, rng.randint(*s.output_tokens))
        self.jobs.append(job)
        return job


async def run_load(
    target: Target,
    shape: JobShape,
    duration_s: float,
    rate: float | None = None,
    concurrency: int | None = None,
    drain_timeout_s: float = 120.0,
) -> LoadRun:
    """Offer load for `duration_s` (open loop at `rate` jobs/s, or closed loop with `concurrency`
    jobs in flight), then wait up to `drain_timeout_s` for the outstanding results."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
    source, waiting = _JobSource(shape), {}
    results = await _results_reader(target)
    producer = AIOKafkaProducer(
        bootstrap_servers=target.bootstrap, acks="all", linger_ms=2, **target.security
    )
    await producer.start()
    samples: list[MetricsSample] = []
    tasks = [asyncio.create_task(_read_results(results, waiting))]
    if target.metrics_url:
        tasks.append(asyncio.create_task(sample_metrics(target.metrics_url, samples)))
    try:
        send = _sender(producer, target.jobs_topic, waiting)
        if rate is not None:
            mode = f"open loop, {rate:g} jobs/s (Poisson)"
            await _open_loop(source, send, rate, duration_s, random.Random(shape.seed + 1))
        else:
            mode = f"closed loop, {concurrency} jobs in flight"
            await _closed_loop(source, send, concurrency, duration_s, drain_timeout_s)
        await _drain(waiting, drain_timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await producer.stop()
        await results.stop()
    return LoadRun(mode, duration_s, source.jobs, samples)


def _sender(producer: AIOKafkaProducer, topic: str, waiting: dict[str, tuple[Job, asyncio.Future]]):
    async def send(job: Job) -> asyncio.Future:
        body = {"prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True}
        line = {"custom_id": job.custom_id, "method": "POST", "url": "/v1/completions", "body": body}
        done = asyncio.get_running_loop().create_future()
        waiting[job.custom_id] = (job, done)
        ack = await producer.send(topic, json.dumps(line).encode(), key=job.custom_id.encode())
        ack.add_done_callback(lambda f: _sent(job, f))
        return done

    return send


def _sent(job: Job, ack: asyncio.Future) -> None:
    if ack.cancelled() or ack.exception() is not None:
        job.error = "not_sent"
    else:
        job.sent = ack.result().timestamp / 1000


async def _open_loop(source: _JobSource, send, rate: float, duration_s: float, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    start, at = loop.time(), 0.0
    while (at := at + rng.expovariate(rate)) < duration_s:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        await send(source.next())


async def _closed_loop(
    source: _JobSource, send, concurrency: int, duration_s: float, result_timeout_s: float
) -> None:
    deadline = time.monotonic() + duration_s

    async def user() -> None:  # one of `concurrency` users, each waiting for its result before the next job
        while time.monotonic() < deadline:
            done = await send(source.next())
            try:
                await asyncio.wait_for(asyncio.shield(done), result_timeout_s)
            except TimeoutError:
                return  # the service stopped answering: _drain marks what is missing

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def _drain(waiting: dict, timeout_s: float) -> None:
    pending = [done for _, done in waiting.values()]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)
    for job, done in list(waiting.values()):
        if not done.done():
            job.error = job.error or "no_result"


async def _read_results(consumer: AIOKafkaConsumer, waiting: dict) -> None:
    while True:
        for batch in (await consumer.getmany(timeout_ms=200)).values():
            for record in batch:
                entry = waiting.pop(record.key.decode() if record.key else "", None)
                if entry is not None:
                    _record_result(entry[0], record)
                    entry[1].set_result(None)


def _record_result(job: Job, record) -> None:
    line = json.loads(record.value)
    job.finished = record.timestamp / 1000
    response = line.get("response") or {}
    if line.get("error") or response.get("status_code", 500) >= 400:  # either place a failure is kept
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        job.error = error.get("code") or "error"
        return
    body = line["response"]["body"]
    job.output_tokens = body["usage"]["completion_tokens"]
    timings = body.get("sluice") or {}
    job.queue_s = timings["queue_ms"] / 1000 if timings.get("queue_ms") is not None else None
    job.ttft_s = timings["ttft_ms"] / 1000 if timings.get("ttft_ms") is not None else None


async def _results_reader(target: Target) -> AIOKafkaConsumer:
    """A group-less reader at the end of the results topic, positioned before any job is sent."""
    admin = AIOKafkaAdminClient(bootstrap_servers=target.bootstrap, **target.security)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([target.results_topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for p in description.get("partitions", [])]
    if description.get("error_code") or not partitions:
        raise SystemExit(f"results topic {target.results_topic!r} does not exist; is the service running?")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=target.bootstrap, enable_auto_commit=False, **target.security
    )
    await consumer.start()
    assigned = [TopicPartition(target.results_topic, p) for p in partitions]
    consumer.assign(assigned)
    await consumer.seek_to_end(*assigned)
    for tp in assigned:
        await consumer.position(tp)
    return consumer
