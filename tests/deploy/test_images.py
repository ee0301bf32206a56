"""The images built and run for real with podman (tests/deploy/podman.py holds this machine's flags):
the Kafka image from the Maven-fetched jars, Sluice's CPU image on a debootstrap Debian base, two
Sluice containers sharing the jobs topic's partitions, and one of them killed mid-burst.

The containers use the host's network on ports of their own (Kafka 39092-39094, Sluice 39465 and
39466), so they run beside the developers' broker on 19092; each is removed after the test, also
when it fails."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tests.deploy import podman
from tests.service.conftest import KafkaClient

# On a fresh machine the first test here builds the Kafka and Sluice CPU images from nothing
# (podman.BUILD_TIMEOUT_S each at most), then runs for minutes: the suite's 600 s would cut it off.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * podman.BUILD_TIMEOUT_S + 600)]

R = podman.REPO_ROOT
KAFKA_PORT = 39092
BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
SLUICE_PORTS = (39465, 39466)
NUM_JOBS = 80


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    podman.ensure_tools()
    return {"kafka": podman.kafka_image(), "sluice": podman.sluice_cpu_image()}


@pytest.fixture
def containers():
    """Starts containers by name; removes every one of them afterwards."""
    names: list[str] = []

    def run(image: str, *env: str) -> str:
        name = f"sluice-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        flags = [f"--env={e}" for e in env]
        podman.podman("run", "-d", "--name", name, "--network", "host", *podman.ULIMITS, *flags, image)
        return name

    yield run
    for name in reversed(names):
        podman.podman("rm", "-f", "-v", "-t", "5", name, check=False)


def test_two_sluice_containers_answer_every_job_when_one_is_killed_mid_burst(images, containers):
    kafka = containers(
        images["kafka"],
        "KAFKA_ADVERTISED_HOST=127.0.0.1",
        f"KAFKA_PORT={KAFKA_PORT}",
        f"KAFKA_CONTROLLER_PORT={KAFKA_PORT + 1}",
        f"KAFKA_HOST_PORT={KAFKA_PORT + 2}",
    )
    _wait_for_broker(kafka)
    prefix = f"images-{uuid.uuid4().hex[:6]}"
    sluices = [containers(images["sluice"], *_sluice_env(prefix, port)) for port in SLUICE_PORTS]
    for port in SLUICE_PORTS:
        _wait_http(f"http://127.0.0.1:{port}/readyz", timeout=300)
    client = KafkaClient(BOOTSTRAP)
    jobs = [_job(i) for i in range(NUM_JOBS)]
    asyncio.run(
        client.post(f"{prefix}.jobs", [(j["custom_id"].encode(), json.dumps(j).encode(), []) for j in jobs])
    )
    asyncio.run(client.read(f"{prefix}.results", 5, timeout=120))  # the burst is under way
    podman.podman("kill", sluices[0])  # SIGKILL: no drain, no final commit
    answered = _answered(client, f"{prefix}.results", {j["custom_id"] for j in jobs}, timeout=240)
    assert answered == {j["custom_id"] for j in jobs}
    assert podman.podman("inspect", "-f", "{{.State.Running}}", sluices[1]).stdout.strip() == "true"


def test_cuda_image_builds_with_torch_built_for_cuda():
    """Built on the Debian base, not run as a service: there is no GPU here."""
    podman.ensure_tools()
    tag = podman.sluice_cuda_image()
    probe = "import torch, service; print(torch.version.cuda)"
    result = podman.podman("run", "--rm", *podman.ULIMITS, "--entrypoint", "python3", tag, "-c", probe)
    assert result.stdout.strip(), result.stderr  # a CUDA build of torch: its CUDA version


def _sluice_env(prefix: str, port: int) -> list[str]:
    return [
        f"SLUICE_KAFKA_BOOTSTRAP={BOOTSTRAP}",
        f"SLUICE_JOBS_TOPICS={prefix}.jobs",
        f"SLUICE_RESULTS_TOPIC={prefix}.results",
        f"SLUICE_DLQ_TOPIC={prefix}.dlq",
        f"SLUICE_TRACES_TOPIC={prefix}.traces",
        f"SLUICE_GROUP_ID={prefix}",
        "SLUICE_TOPIC_PARTITIONS=4",
        "SLUICE_HTTP_HOST=127.0.0.1",
        f"SLUICE_HTTP_PORT={port}",
        "SLUICE_ENGINE_DTYPE=float32",
    ]


def _job(i: int) -> dict:
    body = {"prompt": f"request {i}", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    return {"custom_id": f"job-{i}", "url": "/v1/completions", "body": body}


def _answered(client: KafkaClient, topic: str, wanted: set[str], timeout: float) -> set[str]:
    """custom_ids with a 200 result, read until every wanted one is there or the time runs out."""
    deadline, answered = time.monotonic() + timeout, set()
    while time.monotonic() < deadline and not wanted <= answered:
        records = asyncio.run(client.read_all(topic, quiet=3))
        answered = {
            line["custom_id"]
            for line in (json.loads(r.value) for r in records)
            if line["response"]["status_code"] == 200
        }
    return answered


def _wait_for_broker(container: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            asyncio.run(_bootstrap())
            return
        except KafkaError:
            time.sleep(1)
    logs = podman.podman("exec", container, "tail", "-30", "/var/lib/kafka/logs/server.log", check=False)
    pytest.fail(f"the Kafka container did not answer on {BOOTSTRAP}:\n{logs.stdout}")


async def _bootstrap() -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
    try:
        await producer.start()
    finally:
        await producer.stop()


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=3).close()
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout}s")
