"""A service's replicas from outside: logs, exec, jobs and cron, as ``zlayerctl logs``,
``exec``, ``job`` and ``job cron`` do them.

Logs are read from the files agentd names (``LogPaths``) with the reader
``zlayerctl logs`` uses (``shared.logread``) and stream as NDJSON, one
``LogLine`` per line. Exec hands agentd pipes apid made and collects what
comes out of them: bounded in size (``EXEC_OUTPUT_LIMIT``) and time
(``?timeout=``) for the JSON route, relayed frame by frame over the
WebSocket one. In a cluster a replica another node runs is reached through
that node (``shared.cluster.remote``), with the same bounds; the caller's
token and role are checked here first, as for this node's replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from daemons.apid.base import api, body_as, query_flag, query_int, reply, visible
from daemons.apid.problems import ApiProblem, problem_for, unexpected_problem
from daemons.apid.routing import Role, route
from shared import logread
from shared.bus import NotFoundError, UnavailableError
from shared.clients import AgentClient, SchedulerClient
from shared.cluster.locate import Placed, Unread, first_running, locate
from shared.execpipes import (
    DRAIN_AFTER_EXIT,
    MAX_TERMINAL_SIDE,
    READ_CHUNK,
    chunks,
    pipe_writer,
    set_size,
)
from shared.execpipes import close_fds as _close
from shared.paths import Paths
from shared.wire import encode
from shared.wire.agent import JobRun
from shared.wire.api import ExecRequest, ExecResult, LogLine
from shared.wire.peer import LogsChunk
from shared.wire.scheduler import CronSchedule

if TYPE_CHECKING:
    from shared.cluster.remote import NodeReach

NDJSON = "application/x-ndjson"
WORKLOAD_TAGS = ("workloads",)
JOB_TAGS = ("jobs",)

MAX_TAIL = 1_000_000
LIVENESS_CHECK = 5.0  # seconds between checks that a follower of a quiet log is still there

EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes of stdout and stderr together
EXEC_TIMEOUT = 60  # seconds, unless ?timeout= says otherwise
EXEC_MAX_TIMEOUT = 3600
WS_EXIT_GRACE = 10.0  # after the client closed: how long the command has to end on its EOF
WS_UNSUPPORTED = 1003  # the close code of a frame the route does not take
BAD_TEXT_FRAME = (
    'a text frame must be {"resize": {"cols": C, "rows": R}} (1 to 65535 each); '
    "send the command's input as binary frames"
)


# ---------------------------------------------------------------- replicas


_reach: list[NodeReach] = []  # made at the first call to another node


def node_reach() -> NodeReach:
    """How apid reaches the replicas of the cluster's other nodes (this node's certificate);
    gRPC and the PKI load here, at the first call to another node."""
    from shared.cluster.remote import NodeReach

    if not _reach:
        _reach.append(NodeReach(Paths.from_env()))
    return _reach[0]


async def running_placed(
    agent: AgentClient, scheduler: SchedulerClient, deployment: str, service: str, which: str
) -> Placed:
    """The first running replica ``which`` names, on whichever node runs it."""
    return first_running(await locate(agent, scheduler, deployment, service, which), service)


# ---------------------------------------------------------------- logs


async def _log_sources(
    agent: AgentClient, scheduler: SchedulerClient, deployment: str, service: str, which: str
) -> list[tuple[str, list[str]] | Placed]:
    """(replica id, its log files) to read, or a replica another node runs: the chosen
    replicas, or a job's last run when no run is going (what ``zlayerctl logs JOB``
    prints)."""
    if not which and not await agent.list_replicas(deployment, service):
        runs = await agent.list_job_runs(deployment, service)
        if runs:
            run_id = f"{deployment}-{service}-{runs[0].id}"  # newest first
            return [(run_id, list(await agent.log_paths(run_id)))]
    placed = await locate(agent, scheduler, deployment, service, which)
    return [
        (p.replica.id, list(await agent.log_paths(p.replica.id))) if p.here else p for p in placed
    ]


async def _far_history(
    placed: Placed, tail: int | None, follow: bool
) -> tuple[list[LogLine], AsyncGenerator[LogsChunk, None] | None]:
    """A replica of another node: its lines so far, and its stream of new ones to follow."""
    stream = node_reach().logs(placed, tail, follow)
    lines: list[LogLine] = []
    async for chunk in stream:
        lines += chunk.lines
        if chunk.caught_up:
            break
    if follow:
        return lines, stream
    await stream.aclose()
    return lines, None


def _quoted(text: str) -> str:
    """``text`` as an HTTP quoted-string: one line, quotes and backslashes escaped."""
    one_line = " ".join(text.split())
    return one_line.replace("\\", "\\\\").replace('"', '\\"')


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _follow_all(
    request: web.Request,
    response: web.StreamResponse,
    followed: list[tuple[str, str, int]],
    far: list[AsyncGenerator[LogsChunk, None]],
) -> None:
    """Write what is appended to each (replica, file, offset), and what each stream of
    another node's replica brings, until the client leaves."""
    queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=10_000)

    async def one(replica: str, path: str, offset: int) -> None:
        async for line in logread.follow(path, offset):
            await queue.put(logread.wire_line(replica, line))

    async def far_one(stream: AsyncGenerator[LogsChunk, None]) -> None:
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                for line in chunk.lines:
                    await queue.put(line)

    tasks = [asyncio.create_task(one(*item)) for item in followed]
    tasks += [asyncio.create_task(far_one(stream)) for stream in far]
    try:
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), LIVENESS_CHECK)
            except TimeoutError:
                if _client_gone(request):
                    return
                continue
            batch = [first]
            while not queue.empty() and len(batch) < 1000:
                batch.append(queue.get_nowait())
            await response.write("".join(encode(line) + "\n" for line in batch).encode())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@route(
    "GET",
    "/deployments/{dep}/services/{svc}/logs",
    role=Role.VIEWER,
    summary="A service's logs as NDJSON, one LogLine per line (zlayerctl logs)",
    deployment="dep",
    returns=LogLine,
    content=NDJSON,
    query={
        "tail": "only the last N lines of each replica",
        "follow": "true: keep the stream open and send new lines as they are written",
        "replica": "only this replica (its id, or its instance number 1, 2, ...)",
    },
    tags=WORKLOAD_TAGS,
)
async def service_logs(request: web.Request) -> web.StreamResponse:
    deployment, service = request.match_info["dep"], request.match_info["svc"]
    tail = None
    if request.query.get("tail", "") != "":
        tail = query_int(request, "tail", 0, 0, MAX_TAIL)
    follow = query_flag(request, "follow")
    clients = api(request)
    sources = await _log_sources(
        clients.agent, clients.scheduler, deployment, service, request.query.get("replica", "")
    )
    # Every replica's lines so far before the reply starts. Another node that does not
    # answer leaves out its replicas, named in a Warning header (199, one per node); when
    # no replica could be read, it is a problem document, not an empty stream.
    histories: list[list[LogLine]] = []
    followed: list[tuple[str, str, int]] = []
    far: list[AsyncGenerator[LogsChunk, None]] = []
    unread = Unread()
    try:
        for source in sources:
            if isinstance(source, Placed):
                if unread.failed(source.replica):
                    unread.add(source.replica, UnavailableError(""))
                    continue
                try:
                    lines, stream = await _far_history(source, tail, follow)
                except UnavailableError as exc:
                    unread.add(source.replica, exc)
                    continue
                unread.read += 1
                histories.append(lines)
                if stream is not None:
                    far.append(stream)
                continue
            replica, paths = source
            start, found = await asyncio.to_thread(logread.history, paths, tail, follow)
            unread.read += 1
            if start is not None:
                followed.append((replica, paths[-1], start))
            histories.append([logread.wire_line(replica, line) for line in found])
        if unread.first is not None and not unread.read:
            raise unread.first
    except BaseException:
        for stream in far:
            await stream.aclose()
        raise
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    for warning in unread.warnings():
        response.headers.add("Warning", f'199 - "{_quoted(warning)}"')
    try:
        await response.prepare(request)
        for lines in histories:
            for start in range(0, len(lines), 1000):
                chunk = lines[start : start + 1000]
                await response.write("".join(encode(line) + "\n" for line in chunk).encode())
        if followed or far:
            await _follow_all(request, response, followed, far)
            far = []
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
    finally:
        for stream in far:
            await stream.aclose()
    return response


# ---------------------------------------------------------------- exec


class _Collected:
    """Reads two pipes into memory as their data comes, up to a shared limit."""

    def __init__(self, fds: tuple[int, int], limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.total = 0
        self.data = {fd: bytearray() for fd in fds}
        self.ended = {fd: asyncio.Event() for fd in fds}
        self.over = asyncio.Event()
        for fd in fds:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self.loop.remove_reader(fd)
            self.ended[fd].set()
            return
        self.data[fd] += chunk
        self.total += len(chunk)
        if self.total > self.limit:
            self.over.set()
            self.stop()

    def stop(self) -> None:
        for fd in self.data:
            self.loop.remove_reader(fd)

    async def until_ended(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for event in self.ended.values():
                    await event.wait()


def _too_much(limit: int) -> ApiProblem:
    return ApiProblem(
        422,
        f"the command wrote more than {limit // (1024 * 1024)} MiB; "
        "use the exec WebSocket (exec/ws) for large output, or write it to a file",
    )


def _too_long(timeout: float) -> ApiProblem:
    return ApiProblem(
        504,
        f"the command did not end within {timeout:g} s and its output was dropped; "
        f"raise ?timeout= (at most {EXEC_MAX_TIMEOUT}) or use the exec WebSocket (exec/ws)",
    )


async def run_on_node(placed: Placed, command: list[str], timeout: float, limit: int) -> ExecResult:
    """:func:`run_collected` for a replica another node runs, with the same bounds: the
    command's stdin empty, its output kept up to ``limit`` for ``timeout`` at most."""
    out = {"stdout": bytearray(), "stderr": bytearray()}
    total = 0
    async with node_reach().exec(placed, command) as run:
        await run.end_input()
        try:
            async with asyncio.timeout(timeout):
                async for stream, data in run.output():
                    out[stream] += data
                    total += len(data)
                    if total > limit:
                        raise _too_much(limit)
        except TimeoutError:
            raise _too_long(timeout) from None
    return ExecResult(
        exit_code=run.exit_code if run.exit_code is not None else -1,
        stdout=out["stdout"].decode(errors="replace"),
        stderr=out["stderr"].decode(errors="replace"),
    )


async def run_collected(
    agent: AgentClient, replica: str, command: list[str], timeout: float, limit: int
) -> ExecResult:
    """Run ``command`` in ``replica`` with pipes of ours; its exit code and output.

    The command's stdin is empty (at its end at once). Our write ends stay
    open until agentd answers, so an output the command's own children keep
    open does not end the reading early; after the answer they close and
    what is left is read for DRAIN_AFTER_EXIT at most.
    """
    stdin_r, stdin_w = os.pipe()
    os.close(stdin_w)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ours = [stdin_r, out_w, err_w]
    collected = _Collected((out_r, err_r), limit)
    call = asyncio.ensure_future(agent.exec(replica, command, False, stdin_r, out_w, err_w))
    over = asyncio.ensure_future(collected.over.wait())
    try:
        done, _ = await asyncio.wait({call, over}, timeout=timeout, return_when="FIRST_COMPLETED")
        if collected.over.is_set():
            raise _too_much(limit)
        if call not in done:
            raise _too_long(timeout)
        exit_code = call.result()
        _close(ours)
        ours = []
        await collected.until_ended(DRAIN_AFTER_EXIT)
        if collected.over.is_set():
            raise _too_much(limit)
        return ExecResult(
            exit_code=exit_code,
            stdout=collected.data[out_r].decode(errors="replace"),
            stderr=collected.data[err_r].decode(errors="replace"),
        )
    finally:
        collected.stop()
        # Closing the read ends gives a command still writing EPIPE: it ends at its next write.
        _close([*ours, out_r, err_r])
        over.cancel()
        if not call.done():
            call.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(call, over, return_exceptions=True)


@route(
    "POST",
    "/deployments/{dep}/services/{svc}/exec",
    role=Role.OPERATOR,
    summary="Run a command in a running replica; its exit code and output (zlayerctl exec)",
    deployment="dep",
    body=ExecRequest,
    returns=ExecResult,
    query={
        "timeout": f"seconds the command may run (default {EXEC_TIMEOUT}, at most "
        f"{EXEC_MAX_TIMEOUT}); 504 beyond. Output beyond {EXEC_OUTPUT_LIMIT // 1048576} MiB: 422",
    },
    tags=WORKLOAD_TAGS,
)
async def service_exec(request: web.Request) -> web.StreamResponse:
    deployment, service = request.match_info["dep"], request.match_info["svc"]
    asked: ExecRequest = await body_as(request, ExecRequest)
    if not asked.command or not asked.command[0]:
        raise ApiProblem(400, "the command is empty; send at least the program to run")
    timeout = query_int(request, "timeout", EXEC_TIMEOUT, 1, EXEC_MAX_TIMEOUT)
    clients = api(request)
    placed = await running_placed(
        clients.agent, clients.scheduler, deployment, service, asked.replica
    )
    if not placed.here:
        result = await run_on_node(placed, asked.command, timeout, EXEC_OUTPUT_LIMIT)
    else:
        result = await run_collected(
            clients.agent, placed.replica.id, asked.command, timeout, EXEC_OUTPUT_LIMIT
        )
    return reply(result)


async def _relay_output(fd: int, ws: web.WebSocketResponse) -> None:
    # aclosing: the reader is removed from the loop here, before the fd is closed
    async with contextlib.aclosing(chunks(fd)) as found:
        async for chunk in found:
            if ws.closed:
                return
            await ws.send_bytes(chunk)


def _resize(text: str) -> tuple[int, int] | None:
    """(cols, rows) of a ``{"resize": {"cols": C, "rows": R}}`` frame; None if it is not one."""
    try:
        sent: Any = json.loads(text)
    except ValueError:
        return None
    size = sent.get("resize") if isinstance(sent, dict) else None
    if not isinstance(size, dict):
        return None
    cols, rows = size.get("cols"), size.get("rows")
    if type(cols) is not int or type(rows) is not int:  # not bool, float or text
        return None
    if not (1 <= cols <= MAX_TERMINAL_SIDE and 1 <= rows <= MAX_TERMINAL_SIDE):
        return None
    return cols, rows


async def _relay_input(
    ws: web.WebSocketResponse, writer: asyncio.StreamWriter, terminal: int | None
) -> None:
    """The client's binary frames to the command's stdin, its resize text frames to the
    terminal (if it has one); the socket's end closes stdin."""
    try:
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                writer.write(message.data)
            elif message.type == WSMsgType.TEXT:
                size = _resize(message.data)
                if size is None:
                    await ws.close(code=WS_UNSUPPORTED, message=BAD_TEXT_FRAME.encode())
                    break
                if terminal is not None:
                    set_size(terminal, *size)
                continue
            else:
                break
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass  # the command closed its stdin or ended
    finally:
        writer.close()


@route(
    "GET",
    "/deployments/{dep}/services/{svc}/exec/ws",
    role=Role.OPERATOR,
    summary="Run a command in a running replica over a WebSocket: binary frames are its "
    'stdin and its output, a final text frame {"exit_code": N}; the client\'s text frames '
    'are {"resize": {"cols": C, "rows": R}}, the size of the terminal apid holds (with tty=1; '
    "the OCI runtime's exec reads it at the start, so ?cols=&rows= are what the command "
    "sees; any other text frame closes the socket with code 1003)",
    deployment="dep",
    content="websocket",
    status=101,
    query={
        "command": "the program and its arguments, one ?command= each, in order",
        "tty": "1: give the command a terminal",
        "cols": "with tty=1: the terminal's columns at the start (with rows)",
        "rows": "with tty=1: the terminal's rows at the start (with cols)",
        "replica": "the replica (its id, or its instance number); default the first running",
    },
    tags=WORKLOAD_TAGS,
)
async def service_exec_ws(request: web.Request) -> web.StreamResponse:
    deployment, service = request.match_info["dep"], request.match_info["svc"]
    command = request.query.getall("command", [])
    if not command or not command[0]:
        raise ApiProblem(400, "?command= is missing; give the program and each argument as one")
    tty = query_flag(request, "tty")
    cols = query_int(request, "cols", 0, 1, MAX_TERMINAL_SIDE)
    rows = query_int(request, "rows", 0, 1, MAX_TERMINAL_SIDE)
    if bool(cols) != bool(rows):
        raise ApiProblem(400, "give the terminal's size as both ?cols= and ?rows=, or neither")
    clients = api(request)
    agent = clients.agent
    placed = await running_placed(
        agent, clients.scheduler, deployment, service, request.query.get("replica", "")
    )
    if not placed.here:
        return await _exec_ws_on_node(request, placed, command, tty, cols, rows)
    replica = placed.replica
    try:
        if tty:
            # The runtime wants a terminal as its stdin for --tty (it sets it raw) and
            # relays the command's terminal to its stdout: a pty's far end is its stdin,
            # the client's input goes to the near end; the output comes through a pipe.
            stdin_w, stdin_r = os.openpty()
            if cols:
                set_size(stdin_w, cols, rows)
        else:
            stdin_r, stdin_w = os.pipe()
    except OSError as exc:
        raise ApiProblem(
            503, f"apid cannot open a terminal for the command ({exc.strerror}); leave out tty=1"
        ) from None
    out_r, out_w = os.pipe()
    ours = [stdin_r, out_w]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=READ_CHUNK * 16)
    try:
        await ws.prepare(request)
    except BaseException:
        _close([*ours, stdin_w, out_r])
        raise
    call = asyncio.ensure_future(agent.exec(replica.id, command, tty, stdin_r, out_w, out_w))
    writer = await pipe_writer(stdin_w)
    output = asyncio.create_task(_relay_output(out_r, ws))
    relay_in = asyncio.create_task(_relay_input(ws, writer, stdin_w if tty else None))
    try:
        await asyncio.wait({call, relay_in}, return_when="FIRST_COMPLETED")
        if not call.done():  # the client closed: the command has its stdin's end
            await asyncio.wait({call}, timeout=WS_EXIT_GRACE)
        if call.done():
            _close(ours)
            ours = []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(output), DRAIN_AFTER_EXIT)
            if not ws.closed:
                error = call.exception()
                if error is None:
                    await ws.send_str(json.dumps({"exit_code": call.result()}))
                else:
                    # the socket is open: the problem document is its last text frame
                    problem = problem_for(error) or unexpected_problem(request, error)
                    await ws.send_str(problem.text or "{}")
    finally:
        for task in (output, relay_in):
            task.cancel()
        if not call.done():
            call.cancel()
        await asyncio.gather(output, relay_in, call, return_exceptions=True)
        _close([*ours, out_r])
        await ws.close()
    return ws


async def _exec_ws_on_node(
    request: web.Request, placed: Placed, command: list[str], tty: bool, cols: int, rows: int
) -> web.WebSocketResponse:
    """The exec WebSocket for a replica another node runs: its frames to and from that
    node's Exec, stderr with stdout as here; the node not answering is a problem document
    before the socket opens."""
    async with node_reach().exec(placed, command, tty=tty, cols=cols, rows=rows, merge=True) as run:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=READ_CHUNK * 16)
        await ws.prepare(request)

        async def relay_out() -> None:
            async for _stream, data in run.output():
                if ws.closed:
                    return
                await ws.send_bytes(data)

        async def relay_in() -> None:
            try:
                async for message in ws:
                    if message.type == WSMsgType.BINARY:
                        await run.write(message.data)
                    elif message.type == WSMsgType.TEXT:
                        size = _resize(message.data)
                        if size is None:
                            await ws.close(code=WS_UNSUPPORTED, message=BAD_TEXT_FRAME.encode())
                            break
                        await run.resize(*size)
                    else:
                        break
            finally:
                await run.end_input()

        output = asyncio.create_task(relay_out())
        relay = asyncio.create_task(relay_in())
        try:
            await asyncio.wait({output, relay}, return_when="FIRST_COMPLETED")
            if not output.done():  # the client closed: the command has its stdin's end
                await asyncio.wait({output}, timeout=WS_EXIT_GRACE)
            if output.done() and not ws.closed:
                error = output.exception()
                if error is None:
                    await ws.send_str(json.dumps({"exit_code": run.exit_code}))
                else:
                    problem = problem_for(error) or unexpected_problem(request, error)
                    await ws.send_str(problem.text or "{}")
        finally:
            for task in (output, relay):
                task.cancel()
            await asyncio.gather(output, relay, return_exceptions=True)
            await ws.close()
    return ws


# ---------------------------------------------------------------- jobs and cron


def _query_deployment(request: web.Request) -> str:
    deployment = request.query.get("deployment", "")
    if not deployment:
        raise ApiProblem(400, "?deployment= is missing; name the deployment the service is in")
    return deployment


@route(
    "POST",
    "/jobs/{svc}/trigger",
    role=Role.OPERATOR,
    summary="Start a run of a job (or cron job) now (zlayerctl job trigger)",
    deployment="?deployment",
    returns=JobRun,
    query={"deployment": "the deployment the job is in (required)"},
    tags=JOB_TAGS,
)
async def job_trigger(request: web.Request) -> web.StreamResponse:
    return await _trigger(request)


async def _trigger(request: web.Request) -> web.StreamResponse:
    """A run of the job or cron job now (TriggerJob); its JobRun."""
    deployment = _query_deployment(request)
    run = await api(request).scheduler.trigger_job(deployment, request.match_info["svc"])
    return reply(run)


@route(
    "GET",
    "/jobs/{svc}/executions",
    role=Role.VIEWER,
    summary="The runs of a job or cron job, newest first (zlayerctl job status)",
    deployment="?deployment",
    returns=list[JobRun],
    query={"deployment": "the deployment the job is in (required)"},
    tags=JOB_TAGS,
)
async def job_executions(request: web.Request) -> web.StreamResponse:
    deployment = _query_deployment(request)
    runs = await api(request).agent.list_job_runs(deployment, request.match_info["svc"])
    return reply(runs)


@route(
    "GET",
    "/cron",
    role=Role.VIEWER,
    summary="Cron jobs with their schedule, next and last run (zlayerctl job cron ls)",
    returns=list[CronSchedule],
    query={"deployment": "only this deployment"},
    tags=JOB_TAGS,
)
async def cron_list(request: web.Request) -> web.StreamResponse:
    schedules = await api(request).scheduler.list_cron(request.query.get("deployment", ""))
    return reply(visible(request, schedules))


@route(
    "POST",
    "/cron/{svc}/trigger",
    role=Role.OPERATOR,
    summary="Start a run of a cron job now, outside its schedule",
    deployment="?deployment",
    returns=JobRun,
    query={"deployment": "the deployment the cron job is in (required)"},
    tags=JOB_TAGS,
)
async def cron_trigger(request: web.Request) -> web.StreamResponse:
    return await _trigger(request)


async def _set_cron(request: web.Request, enabled: bool) -> web.StreamResponse:
    deployment = _query_deployment(request)
    service = request.match_info["svc"]
    scheduler = api(request).scheduler
    await scheduler.set_cron_enabled(deployment, service, enabled)
    found = [s for s in await scheduler.list_cron(deployment) if s.service == service]
    if not found:
        raise NotFoundError(f"{service} is not a cron job of {deployment}")
    return reply(found[0])


@route(
    "PUT",
    "/cron/{svc}/enable",
    role=Role.OPERATOR,
    summary="Turn a cron job's schedule on again (SetCronEnabled); its schedule now",
    deployment="?deployment",
    returns=CronSchedule,
    query={"deployment": "the deployment the cron job is in (required)"},
    tags=JOB_TAGS,
)
async def cron_enable(request: web.Request) -> web.StreamResponse:
    return await _set_cron(request, True)


@route(
    "PUT",
    "/cron/{svc}/disable",
    role=Role.OPERATOR,
    summary="Turn a cron job's schedule off: it does not fire until enabled (SetCronEnabled)",
    deployment="?deployment",
    returns=CronSchedule,
    query={"deployment": "the deployment the cron job is in (required)"},
    tags=JOB_TAGS,
)
async def cron_disable(request: web.Request) -> web.StreamResponse:
    return await _set_cron(request, False)
