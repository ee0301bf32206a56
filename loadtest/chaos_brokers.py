"""The brokers of a chaos run: a KRaft cluster of its own, the only brokers it may kill.

Each node is `deploy/kafka/kafka.sh` (broker and controller in one JVM) on ports of its own, with
its data and logs under a folder of its own; the jars come from `kafka.sh fetch` (Maven Central,
once, into build/kafka as for `make test`) and are linked, not copied, into that folder. Three
nodes: every topic and the internal ones have three replicas and take an acks=all write with two
in sync (min.insync.replicas=2), so that any one node may die. One node: replication 1, as before.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
MIN_INSYNC_REPLICAS = 2  # of three: a write survives one dead node, and one node alone takes none


class ChaosBroker:
    """One KRaft node on `port` (its controller on port + 1), data under `home`: never the shared one."""

    def __init__(
        self, home: Path, port: int, node_id: int = 1, cluster: dict[str, str] | None = None
    ) -> None:
        self.home, self.port, self.node_id = home, port, node_id
        self.bootstrap = f"127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "SLUICE_BUILD_DIR": str(home),
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1),
            "KAFKA_NODE_ID": str(node_id),
            "KAFKA_HEAP": "384m",
            **(cluster or {}),
        }

    def start(self) -> None:
        (self.home / "kafka").mkdir(parents=True, exist_ok=True)
        for libs in (REPO / "build" / "kafka").glob("libs-*"):
            link = self.home / "kafka" / libs.name
            if not link.exists():
                link.symlink_to(libs.resolve())
        self._run("start")

    def hard_kill(self) -> None:
        """kill -9: no clean shutdown, the log is recovered at the next start."""
        pid = int((self.home / "kafka" / f"broker-{self.port}.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.1)

    def stop(self) -> None:
        self._run("stop")

    def _run(self, command: str) -> None:
        subprocess.run([str(KAFKA_SH), command], env=self._env, check=True)


class BrokerCluster:
    """`size` KRaft nodes on ports `port`, `port + 2`, ... (each controller one above its broker)."""

    def __init__(self, home: Path, port: int, size: int = 3) -> None:
        ports = [port + 2 * i for i in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{p + 1}" for i, p in enumerate(ports))
        replicas = str(size)
        cluster = {
            "KAFKA_QUORUM_VOTERS": voters,
            # one cluster id for every node's storage: a node formatted with another refuses the quorum
            "KAFKA_CLUSTER_ID": urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            "KAFKA_REPLICATION": replicas,
            "KAFKA_MIN_ISR": str(min(size, MIN_INSYNC_REPLICAS)),
            # a node killed as it was starting up again must not have to wait out a long start
            "KAFKA_START_TIMEOUT": "120",
        }
        self.nodes = {
            i + 1: ChaosBroker(home / f"node-{i + 1}", p, i + 1, cluster) for i, p in enumerate(ports)
        }
        self.bootstrap = ",".join(n.bootstrap for n in self.nodes.values())
        self.replication = size
        self.min_insync_replicas = min(size, MIN_INSYNC_REPLICAS)

    def start(self) -> None:
        """Every node at once: each waits for a quorum of controllers before it says it started."""
        subprocess.run([str(KAFKA_SH), "fetch"], check=True)  # into build/kafka, once
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(n.start) for n in self.nodes.values()]:
                started.result()

    def stop(self) -> None:
        """Every node at once: the last one left alone would wait for a quorum to shut down."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(ChaosBroker.stop, self.nodes.values()))

    async def kill_and_restart(self, node_id: int, down_s: float) -> None:
        """kill -9 a node, and start it again `down_s` later."""
        node = self.nodes[node_id]
        await asyncio.to_thread(node.hard_kill)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(node.start)

    async def leader_of(self, topic: str, partition: int) -> int:
        """The node that leads `topic`'s `partition` now."""
        for t in await self._describe([topic]):
            for p in t["partitions"]:
                if p["partition"] == partition:
                    return p["leader"]
        raise LookupError(f"{topic}[{partition}] has no leader")

    async def coordinator_of(self, kind: CoordinationType, key: str) -> int:
        """The node that coordinates the group or transactional id `key`: the leader of its
        partition of __consumer_offsets or __transaction_state."""
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap)
        await client.bootstrap()
        try:
            for _ in range(60):
                try:
                    return await client.coordinator_lookup(kind, key)
                except KafkaError as e:  # its internal topic being created, or its leader moving
                    if not e.retriable:
                        raise
                    await asyncio.sleep(0.5)
            raise LookupError(f"no coordinator for {key!r}")
        finally:
            await client.close()

    async def wait_in_sync(self, topics: list[str], timeout: float = 120) -> bool:
        """Until every partition of `topics` has all its replicas in sync (a restarted node has
        caught up), so that the next kill leaves each partition with min.insync.replicas."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                described = await self._describe(topics)
            except Exception:  # a node still coming up: ask again
                described = []
            partitions = [p for t in described for p in t["partitions"]]
            if partitions and all(len(p["isr"]) == len(p["replicas"]) for p in partitions):
                return True
            await asyncio.sleep(1)
        return False

    async def _describe(self, topics: list[str]) -> list[dict]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            return await admin.describe_topics(topics)
        finally:
            await admin.close()
