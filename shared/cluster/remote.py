"""A replica on another node of the cluster: reach it.

:func:`shared.cluster.locate.locate` finds where each replica a command means runs.
A :class:`~shared.cluster.locate.Placed` replica of another node is reached over
gRPC with this node's certificate (:class:`NodeReach`): ``Node1.Logs`` (its lines,
then new ones), ``Node1.Exec`` (stdin in, output and the exit code out) and
``Node1.Stats``, at the address :func:`shared.cluster.peer.peer_address` picks (a
node behind NAT through the mesh).

The answering node serves them (:class:`ReplicaCalls`) through its own agentd
and log files, as a call on that node would: the same reader
(:mod:`shared.logread`), the same pipes (:mod:`shared.execpipes`). Only nodes
of the cluster reach them (the peer port wants a certificate of the cluster's
CA); what a person may do is checked on the calling node before it calls:
zlayerctl's bus policy (root), apid's token and role.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import grpc  # type: ignore[import-untyped]

from shared import logread
from shared.bus import InvalidArgumentError, UnavailableError
from shared.cluster import pki
from shared.cluster.locate import Placed
from shared.cluster.peer import (
    EXEC,
    LOGS,
    STATS,
    NodeTls,
    PeerError,
    decoded,
    duplex,
    node_channel,
    peer_address,
    peer_error,
    streaming,
    target,
    zlayer_unary,
)
from shared.execpipes import DRAIN_AFTER_EXIT, PipedExec
from shared.paths import Paths
from shared.wire import decode, encode
from shared.wire.agent import ReplicaStats
from shared.wire.api import LogLine
from shared.wire.peer import (
    ExecInput,
    ExecOutput,
    ExecStart,
    LogsChunk,
    LogsRequest,
    StatsRequest,
)

CONNECT_TIMEOUT = 5.0  # seconds to reach another node before saying it does not answer
STATS_TIMEOUT = 10.0
HISTORY_BATCH = 1000  # lines a Logs message carries at most
HISTORY_BYTES = 1 << 20  # and about this much text: gRPC takes 4 MiB a message


class AgentCalls(Protocol):
    """What of agentd's client the answering side needs (``shared.clients.AgentClient``)."""

    async def log_paths(self, replica: str) -> list[str]: ...

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int: ...

    async def stats(self, replica: str) -> ReplicaStats: ...


# ---------------------------------------------------------------- the calling node


def _gone(placed: Placed) -> UnavailableError:
    return UnavailableError(
        f"replica {placed.replica.id} ran on node {placed.replica.node}, which is no longer "
        "in the cluster; its replicas move to the other nodes: see zlayerctl ps --containers "
        "and try again"
    )


class NodeReach:
    """Calls from this node to the replicas of others, with this node's certificate
    (root's alone; read at the first call, and again once schedd has renewed it)."""

    def __init__(self, paths: Paths) -> None:
        self.files = pki.ClusterFiles.of(paths)
        self._tls: NodeTls | None = None

    async def tls(self) -> NodeTls:
        try:
            self._tls = await asyncio.to_thread(NodeTls.current, self.files, self._tls)
        except (pki.PkiError, OSError) as exc:
            raise UnavailableError(
                f"this node's cluster certificate cannot be read ({exc}), so a replica on "
                "another node cannot be reached from here; run this as root"
            ) from None
        return self._tls

    async def _channel(self, placed: Placed) -> tuple[Any, str]:
        """An open channel to the node that runs ``placed`` and how to name that node."""
        node = placed.node
        if node is None:
            raise _gone(placed)
        address = peer_address(node, placed.caller)
        where = f"node {node.name or node.id} ({target(address, node.peer_port)})"
        where = where.replace("ipv6:", "")
        if address != node.address:
            where += " through the mesh"
        chan = node_channel(node, placed.caller, await self.tls(), address=address)
        try:
            await asyncio.wait_for(chan.channel_ready(), CONNECT_TIMEOUT)
        except (TimeoutError, grpc.aio.AioRpcError):
            await chan.close()
            if not node.reachable and address == node.address:
                raise UnavailableError(
                    f"{where} cannot be reached from other nodes (it is behind NAT) and this "
                    "node has no mesh to reach it through, so its replica "
                    f"{placed.replica.id} cannot be reached; turn the mesh on (schedd's "
                    "[cluster] mesh) or pick a replica on another node"
                ) from None
            raise UnavailableError(
                f"{where} does not answer within {CONNECT_TIMEOUT:g} s, so its replica "
                f"{placed.replica.id} cannot be reached; check that the node runs "
                "(zlayerctl node ls) or pick a replica on another node"
            ) from None
        return chan, where

    def _failed(self, exc: grpc.aio.AioRpcError, where: str) -> Exception:
        found = peer_error(exc, where)
        if isinstance(found, PeerError):
            return UnavailableError(str(found))
        return found

    async def logs(
        self, placed: Placed, tail: int | None = None, follow: bool = False
    ) -> AsyncGenerator[LogsChunk, None]:
        """The replica's lines (the last ``tail``), a chunk ``caught_up``, then with
        ``follow`` its new lines for as long as the caller reads."""
        chan, where = await self._channel(placed)
        try:
            request = LogsRequest(replica=placed.replica.id, tail=tail, follow=follow)
            call = chan.unary_stream(LOGS)(encode(request).encode())
            try:
                async for raw in call:
                    yield decode(raw, LogsChunk)
            except grpc.aio.AioRpcError as exc:
                raise self._failed(exc, where) from None
            finally:
                call.cancel()
        finally:
            await chan.close()

    async def stats(self, placed: Placed) -> ReplicaStats:
        chan, where = await self._channel(placed)
        try:
            raw = await chan.unary_unary(STATS)(
                encode(StatsRequest(replica=placed.replica.id)).encode(), timeout=STATS_TIMEOUT
            )
            return decode(raw, ReplicaStats)
        except grpc.aio.AioRpcError as exc:
            raise self._failed(exc, where) from None
        finally:
            await chan.close()

    @contextlib.asynccontextmanager
    async def exec(
        self,
        placed: Placed,
        command: list[str],
        *,
        tty: bool = False,
        cols: int = 0,
        rows: int = 0,
        merge: bool = False,
    ) -> AsyncIterator[RemoteExec]:
        """``async with reach.exec(placed, ["sh"]) as run:`` write to ``run``, read
        ``run.output()`` (its end carries the exit code); leaving ends the call."""
        chan, where = await self._channel(placed)
        call = chan.stream_stream(EXEC)()
        try:
            start = ExecStart(
                replica=placed.replica.id,
                command=command,
                tty=tty,
                cols=cols,
                rows=rows,
                merge=merge,
            )
            run = RemoteExec(call, where, self)
            await run._send(start)
            yield run
        finally:
            call.cancel()
            await chan.close()


class RemoteExec:
    """One command running in a replica of another node (:meth:`NodeReach.exec`)."""

    def __init__(self, call: Any, where: str, reach: NodeReach) -> None:
        self._call = call
        self._where = where
        self._reach = reach
        self._input_done = False
        self.exit_code: int | None = None

    async def _send(self, message: ExecStart | ExecInput) -> None:
        if self._input_done:
            return
        try:
            await self._call.write(encode(message).encode())
        except grpc.aio.AioRpcError as exc:
            raise self._reach._failed(exc, self._where) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            self._input_done = True  # the call ended: the command no longer reads

    async def write(self, data: bytes) -> None:
        await self._send(ExecInput(stdin=data))

    async def resize(self, cols: int, rows: int) -> None:
        await self._send(ExecInput(cols=cols, rows=rows))

    async def end_input(self) -> None:
        """The command's stdin at its end, and this side's messages (with a terminal the
        command's terminal hangs up: leave it open while the command should read)."""
        if self._input_done:
            return
        await self._send(ExecInput(eof=True))
        self._input_done = True
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.done_writing()

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """(stream, bytes) as the command writes them; at its end ``exit_code`` is set."""
        try:
            while True:
                raw = await self._call.read()
                if raw is grpc.aio.EOF:
                    break
                message = decode(raw, ExecOutput)
                if message.exit_code is not None:
                    self.exit_code = message.exit_code
                    break
                if message.data:
                    yield message.stream, message.data
        except grpc.aio.AioRpcError as exc:
            raise self._reach._failed(exc, self._where) from None
        if self.exit_code is None:
            raise UnavailableError(
                f"{self._where} ended the command's call without its exit code; "
                "check that node's agentd (zlayerctl status there)"
            )


# ---------------------------------------------------------------- the answering node


class DaemonAgent:
    """agentd over the daemon's own bus (sdbus's default one), made at the first call."""

    def __init__(self) -> None:
        self._client: Any = None

    def _agent(self) -> Any:
        if self._client is None:
            import sdbus

            from shared.clients import AgentClient

            self._client = AgentClient(sdbus.get_default_bus())
        return self._client

    async def log_paths(self, replica: str) -> list[str]:
        paths: list[str] = await self._agent().log_paths(replica)
        return paths

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        code: int = await self._agent().exec(replica, argv, tty, stdin, stdout, stderr)
        return code

    async def stats(self, replica: str) -> ReplicaStats:
        stats: ReplicaStats = await self._agent().stats(replica)
        return stats


class ReplicaCalls:
    """Node1's Logs, Exec and Stats, answered through this node's agentd and log files."""

    def __init__(self, agent: AgentCalls | None = None) -> None:
        self.agent: AgentCalls = agent if agent is not None else DaemonAgent()

    def methods(self) -> dict[str, Any]:
        """The handlers to give :class:`~shared.cluster.peer.PeerServer` (``methods=``)."""
        return {
            "Logs": streaming(LogsRequest, self._logs),
            "Exec": duplex(self._exec),
            "Stats": zlayer_unary(StatsRequest, self._stats),
        }

    async def _logs(
        self, request: LogsRequest, _caller: str, _context: Any
    ) -> AsyncIterator[LogsChunk]:
        if request.tail is not None and request.tail < 0:
            raise InvalidArgumentError("tail must be 0 or more lines")
        paths = list(await self.agent.log_paths(request.replica))
        start, lines = await asyncio.to_thread(logread.history, paths, request.tail, request.follow)
        batch: list[LogLine] = []
        size = 0
        for line in lines:
            batch.append(logread.wire_line(request.replica, line))
            size += len(line.text)
            if len(batch) >= HISTORY_BATCH or size >= HISTORY_BYTES:
                yield LogsChunk(lines=batch)
                batch, size = [], 0
        if batch:
            yield LogsChunk(lines=batch)
        yield LogsChunk(caught_up=True)
        if start is None:
            return
        async for line in logread.follow(paths[-1], start):
            yield LogsChunk(lines=[logread.wire_line(request.replica, line)])

    async def _stats(self, request: StatsRequest, _caller: str, _context: Any) -> ReplicaStats:
        return await self.agent.stats(request.replica)

    async def _exec(
        self, requests: AsyncIterator[bytes], _caller: str, _context: Any
    ) -> AsyncIterator[ExecOutput]:
        incoming = aiter(requests)
        try:
            start = decoded(await anext(incoming), ExecStart)
        except StopAsyncIteration:
            return
        if not start.command or not start.command[0]:
            raise InvalidArgumentError("the command is empty; give at least the program to run")
        session = await PipedExec.start(
            self.agent,
            start.replica,
            start.command,
            tty=start.tty,
            cols=start.cols,
            rows=start.rows,
            merge=start.merge,
        )
        replies: asyncio.Queue[ExecOutput | None] = asyncio.Queue(maxsize=16)

        async def feed() -> None:
            async for raw in incoming:
                message = decoded(raw, ExecInput)
                if message.stdin:
                    await session.write(message.stdin)
                if message.cols and message.rows:
                    session.resize(message.cols, message.rows)
                if message.eof:
                    session.end_input()
            session.hang_up()  # the caller's side ended: a terminal hangs up

        async def relay() -> None:
            async for stream, data in session.output():
                await replies.put(ExecOutput(stream=stream, data=data))
            await replies.put(None)

        tasks = [asyncio.create_task(feed()), asyncio.create_task(relay())]
        code = asyncio.ensure_future(session.exit_code())
        loop = asyncio.get_running_loop()
        drain_until: float | None = None
        try:
            while True:
                if code.done() and drain_until is None:
                    drain_until = loop.time() + DRAIN_AFTER_EXIT
                get = asyncio.ensure_future(replies.get())
                timeout = None if drain_until is None else max(0.0, drain_until - loop.time())
                waits = {get} if code.done() else {get, code}
                await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
                if not get.done():
                    get.cancel()
                    # a get that finished meanwhile keeps its item: nothing is lost
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                if get.done() and not get.cancelled():
                    item = get.result()
                    if item is None:
                        break
                    yield item
                elif drain_until is not None and loop.time() >= drain_until:
                    break
            exit_code = await code  # agentd's error (no such replica, ...) ends the call
            yield ExecOutput(exit_code=exit_code)
        finally:
            for task in tasks:
                task.cancel()
            code.cancel()
            await asyncio.gather(*tasks, code, return_exceptions=True)
            await session.close()
