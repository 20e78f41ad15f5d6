"""Node1's Logs, Exec and Stats on loopback, real peer servers: answered through a real
agentd's replica (six daemons on a private bus), called with a node certificate of the
cluster; refused without one; a node that does not answer, or has left, is one
sentence naming it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest

from shared.bus import NotFoundError, UnavailableError, open_bus, resolve_bus_address
from shared.clients import AgentClient
from shared.cluster import pki
from shared.cluster.locate import Placed
from shared.cluster.peer import LOGS, NodeTls, PeerServer
from shared.cluster.remote import CONNECT_TIMEOUT, NodeReach
from shared.paths import Paths
from shared.wire import encode
from shared.wire.agent import ReplicaInfo
from shared.wire.cluster import NodeCapacity, NodeRecord
from shared.wire.peer import LogsRequest
from tests.e2e.conftest import running_node
from tests.e2e.node import Node

DEPLOYMENT = "far"
SPEC = """
version: v1
deployment: far
services:
  talk:
    image: zlayer/busybox:latest
    env: {GREETING: hello-far}
    command:
      entrypoint: ["sh", "-c"]
      args: ["i=0; while true; do i=$((i+1)); echo line $i; sleep 0.2; done"]
    scale: {mode: fixed, replicas: 1}
"""


class Certs:
    """A cluster CA with two nodes: ``a`` answers, ``b`` calls."""

    def __init__(self, root: Path) -> None:
        self.a = pki.ClusterFiles(root / "a" / "cluster")
        authority = pki.init_cluster(self.a, "node-a", ["127.0.0.1"])
        self.b_paths = Paths(root / "b")
        self.b = pki.ClusterFiles.of(self.b_paths)
        key = pki.make_key()
        certificate = authority.sign(pki.make_csr(key, "node-b", ["127.0.0.1"]))
        self.b.write_ca_certificate(authority.certificate)
        self.b.write_node(key, certificate)


def record(port: int, node_id: str = "node-a") -> NodeRecord:
    return NodeRecord(
        id=node_id,
        name="a",
        address="127.0.0.1",
        peer_port=port,
        capacity=NodeCapacity(cpu=1.0, memory=1 << 30),
    )


@asynccontextmanager
async def answering(certs: Certs, agent: AgentClient | None) -> AsyncIterator[PeerServer]:
    server = PeerServer("node-a", NodeTls.of(certs.a), agent=agent)
    await server.start("127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("running containers needs root")
    prefix = Path(tempfile.gettempdir()) / f"zlr-{os.getpid()}"
    with running_node(prefix, tmp_path_factory, network_tag="zlr") as started:
        spec = started.spec(DEPLOYMENT, SPEC)
        try:
            started.ctl("up", "-d", str(spec), "--timeout", "90", check=True)
            yield started
        finally:
            started.ctl("down", DEPLOYMENT)


def test_logs_exec_and_stats_of_a_replica_through_its_node(node: Node, tmp_path: Path) -> None:
    certs = Certs(tmp_path)

    async def scenario() -> None:
        bus = open_bus(resolve_bus_address(node.paths))
        agent = AgentClient(bus)
        (replica,) = await agent.list_replicas(DEPLOYMENT, "talk")
        async with answering(certs, agent) as server:
            reach = NodeReach(certs.b_paths)
            placed = Placed(replica, here=False, node=record(server.peer_port))

            # its last 3 lines (once it wrote that many), then a chunk that says so
            deadline = time.monotonic() + 20
            while True:
                chunks = [c async for c in reach.logs(placed, tail=3)]
                assert chunks[-1].caught_up and not chunks[-1].lines
                lines = [line for c in chunks for line in c.lines]
                if len(lines) == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert [line.replica for line in lines] == [replica.id] * 3
            counted = [int(line.line.split()[1]) for line in lines]
            assert counted == list(range(counted[0], counted[0] + 3)), lines

            # following: lines written after the call
            stream = reach.logs(placed, tail=0, follow=True)
            first = await anext(stream)
            assert first.caught_up and not first.lines
            later = [await anext(stream) for _ in range(3)]
            await stream.aclose()
            numbers = [int(c.lines[0].line.split()[1]) for c in later]
            assert numbers[0] > counted[-1] and numbers == sorted(numbers), numbers

            # exec: stdin in, stdout and stderr apart, the exit code out
            script = 'echo "$GREETING"; cat; echo oops >&2; exit 5'
            async with reach.exec(placed, ["sh", "-c", script]) as run:
                await run.write(b"through-the-peer\n")
                await run.end_input()
                out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
                async for kind, data in run.output():
                    out[kind] += data
            assert run.exit_code == 5
            assert out == {"stdout": b"hello-far\nthrough-the-peer\n", "stderr": b"oops\n"}

            # with a terminal of the given size (stderr comes with stdout, as on a terminal);
            # crun exec --tty sets the terminal up just after the start (what was written
            # before may go) and relays its last output late: a moment before and after
            script = "sleep 1; until stty size 2>/dev/null; do sleep 0.05; done; sleep 1"
            async with reach.exec(placed, ["sh", "-c", script], tty=True, cols=91, rows=17) as run:
                shown = b"".join([data async for _kind, data in run.output()])
            assert run.exit_code == 0 and shown.split() == [b"17", b"91"], shown

            stats = await reach.stats(placed)
            assert stats.id == replica.id and stats.memory_bytes > 0 and stats.pids >= 1

            # the answering node's own sentence, as its own class
            gone = Placed(
                ReplicaInfo(
                    id=f"{DEPLOYMENT}-talk-9-1",
                    deployment=DEPLOYMENT,
                    service="talk",
                    instance=9,
                    revision=1,
                    image="x",
                    state="running",
                ),
                here=False,
                node=record(server.peer_port),
            )
            with pytest.raises(NotFoundError) as found:
                async with reach.exec(gone, ["true"]) as run:
                    await run.end_input()
                    _ = [chunk async for chunk in run.output()]
            assert "\n" not in str(found.value) and "far-talk-9-1" in str(found.value)
        bus.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_only_cluster_nodes_may_call_and_a_silent_node_is_one_sentence(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    replica = ReplicaInfo(
        id="app-web-1-1",
        deployment="app",
        service="web",
        instance=1,
        revision=1,
        image="x",
        state="running",
        node="node-a",
    )

    async def scenario() -> None:
        async with answering(certs, None) as server:
            # the join port asks for no certificate: Logs there is refused before anything
            ca = certs.a.ca_cert.read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.join_port}", credentials) as c:
                request = encode(LogsRequest(replica=replica.id)).encode()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    _ = [m async for m in c.unary_stream(LOGS)(request)]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "needs a node certificate of the cluster" in (refused.value.details() or "")
            port = server.peer_port
        reach = NodeReach(certs.b_paths)
        # the node's port is closed now: one sentence naming the node, in bounded time
        began = time.monotonic()
        with pytest.raises(UnavailableError) as silent:
            _ = [c async for c in reach.logs(Placed(replica, here=False, node=record(port)))]
        assert time.monotonic() - began < CONNECT_TIMEOUT + 5
        said = str(silent.value)
        assert said.startswith(f"node a (127.0.0.1:{port}) does not answer"), said
        assert "\n" not in said
        # a node no longer in the cluster (its record gone with its lease)
        with pytest.raises(UnavailableError, match="node node-a, which is no longer in the"):
            async with reach.exec(Placed(replica, here=False, node=None), ["true"]):
                pass

    asyncio.run(asyncio.wait_for(scenario(), 60))
