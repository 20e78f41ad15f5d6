"""A service's replicas from outside: logs, exec, jobs and cron, as ``zlayerctl logs``,
``exec``, ``job`` and ``job cron`` do them.

Logs are read from the files agentd names (``LogPaths``) with the reader
``zlayerctl logs`` uses (``shared.logread``) and stream as NDJSON, one
``LogLine`` per line. Exec hands agentd pipes apid made and collects what
comes out of them: bounded in size (``EXEC_OUTPUT_LIMIT``) and time
(``?timeout=``) for the JSON route, relayed frame by frame over the
WebSocket one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import struct
import termios
from collections.abc import AsyncGenerator
from typing import Any, Literal

from aiohttp import WSMsgType, web

from daemons.apid.base import api, body_as, query_flag, query_int, reply, visible
from daemons.apid.problems import ApiProblem, problem_for, unexpected_problem
from daemons.apid.routing import Role, route
from shared import logread
from shared.bus import NotFoundError
from shared.clients import AgentClient
from shared.k8slog import LogLine as FileLine
from shared.replicas import first_running, select_replicas
from shared.wire import encode
from shared.wire.agent import JobRun, ReplicaInfo
from shared.wire.api import ExecRequest, ExecResult, LogLine
from shared.wire.scheduler import CronSchedule

NDJSON = "application/x-ndjson"
WORKLOAD_TAGS = ("workloads",)
JOB_TAGS = ("jobs",)

MAX_TAIL = 1_000_000
LIVENESS_CHECK = 5.0  # seconds between checks that a follower of a quiet log is still there

EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes of stdout and stderr together
EXEC_TIMEOUT = 60  # seconds, unless ?timeout= says otherwise
EXEC_MAX_TIMEOUT = 3600
DRAIN_AFTER_EXIT = 2.0  # a background child may keep the output open after the command ends
WS_EXIT_GRACE = 10.0  # after the client closed: how long the command has to end on its EOF
READ_CHUNK = 64 * 1024
MAX_TERMINAL_SIDE = 65535  # a terminal's columns and rows are unsigned shorts
WS_UNSUPPORTED = 1003  # the close code of a frame the route does not take
BAD_TEXT_FRAME = (
    'a text frame must be {"resize": {"cols": C, "rows": R}} (1 to 65535 each); '
    "send the command's input as binary frames"
)


# ---------------------------------------------------------------- replicas


async def chosen_replicas(
    agent: AgentClient, deployment: str, service: str, which: str
) -> list[ReplicaInfo]:
    """The replicas ``which`` names (every one for ""), as ``zlayerctl logs`` picks them."""
    replicas = await agent.list_replicas(deployment, service)
    return select_replicas(replicas, deployment, service, which)


async def running_replica(
    agent: AgentClient, deployment: str, service: str, which: str
) -> ReplicaInfo:
    return first_running(await chosen_replicas(agent, deployment, service, which), service)


# ---------------------------------------------------------------- logs


def _wire_line(replica: str, line: FileLine) -> LogLine:
    stream: Literal["stdout", "stderr"] = "stderr" if line.stream == "stderr" else "stdout"
    when = line.time.timestamp() if line.time else None
    return LogLine(replica=replica, stream=stream, time=when, line=line.text)


async def _log_sources(
    agent: AgentClient, deployment: str, service: str, which: str
) -> list[tuple[str, list[str]]]:
    """(replica id, its log files) to read: the chosen replicas, or a job's last run when
    no run is going (what ``zlayerctl logs JOB`` prints)."""
    if not which and not await agent.list_replicas(deployment, service):
        runs = await agent.list_job_runs(deployment, service)
        if runs:
            run_id = f"{deployment}-{service}-{runs[0].id}"  # newest first
            return [(run_id, list(await agent.log_paths(run_id)))]
    chosen = await chosen_replicas(agent, deployment, service, which)
    return [(r.id, list(await agent.log_paths(r.id))) for r in chosen]


def _history(paths: list[str], tail: int | None, follow: bool) -> tuple[int | None, list[FileLine]]:
    """Where following the newest file starts (None: not followed) and the lines so far,
    read off the event loop. The start is taken first, so no line falls in between."""
    start = logread.end_offset(paths[-1]) if follow and paths else None
    return start, logread.read_lines(paths, tail)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _follow_all(
    request: web.Request, response: web.StreamResponse, followed: list[tuple[str, str, int]]
) -> None:
    """Write what is appended to each (replica, file, offset) until the client leaves."""
    queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=10_000)

    async def one(replica: str, path: str, offset: int) -> None:
        async for line in logread.follow(path, offset):
            await queue.put(_wire_line(replica, line))

    tasks = [asyncio.create_task(one(*item)) for item in followed]
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
    sources = await _log_sources(
        api(request).agent, deployment, service, request.query.get("replica", "")
    )
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    followed: list[tuple[str, str, int]] = []
    try:
        for replica, paths in sources:
            start, lines = await asyncio.to_thread(_history, paths, tail, follow)
            if start is not None:
                followed.append((replica, paths[-1], start))
            for start in range(0, len(lines), 1000):
                chunk = lines[start : start + 1000]
                await response.write(
                    "".join(encode(_wire_line(replica, line)) + "\n" for line in chunk).encode()
                )
        if followed:
            await _follow_all(request, response, followed)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left
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


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


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
            raise ApiProblem(
                422,
                f"the command wrote more than {limit // (1024 * 1024)} MiB; "
                "use the exec WebSocket (exec/ws) for large output, or write it to a file",
            )
        if call not in done:
            raise ApiProblem(
                504,
                f"the command did not end within {timeout:g} s and its output was dropped; "
                f"raise ?timeout= (at most {EXEC_MAX_TIMEOUT}) or use the exec WebSocket (exec/ws)",
            )
        exit_code = call.result()
        _close(ours)
        ours = []
        await collected.until_ended(DRAIN_AFTER_EXIT)
        if collected.over.is_set():
            raise ApiProblem(
                422,
                f"the command wrote more than {limit // (1024 * 1024)} MiB; "
                "use the exec WebSocket (exec/ws) for large output, or write it to a file",
            )
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
    agent = api(request).agent
    replica = await running_replica(agent, deployment, service, asked.replica)
    result = await run_collected(agent, replica.id, asked.command, timeout, EXEC_OUTPUT_LIMIT)
    return reply(result)


async def _pipe_writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", buffering=0)
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def _chunks(fd: int) -> AsyncGenerator[bytes, None]:
    """What can be read from the pipe ``fd`` as it comes, to its end."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                readable.clear()
                await readable.wait()
                continue
            if not chunk:
                return
            yield chunk
    finally:
        loop.remove_reader(fd)


async def _relay_output(fd: int, ws: web.WebSocketResponse) -> None:
    # aclosing: the reader is removed from the loop here, before the fd is closed
    async with contextlib.aclosing(_chunks(fd)) as chunks:
        async for chunk in chunks:
            if ws.closed:
                return
            await ws.send_bytes(chunk)


def _set_size(terminal: int, cols: int, rows: int) -> None:
    """The terminal's size as the command sees it (``stty size``, $COLUMNS, SIGWINCH)."""
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


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
                    _set_size(terminal, *size)
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
    agent = api(request).agent
    replica = await running_replica(agent, deployment, service, request.query.get("replica", ""))
    try:
        if tty:
            # The runtime wants a terminal as its stdin for --tty (it sets it raw) and
            # relays the command's terminal to its stdout: a pty's far end is its stdin,
            # the client's input goes to the near end; the output comes through a pipe.
            stdin_w, stdin_r = os.openpty()
            if cols:
                _set_size(stdin_w, cols, rows)
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
    writer = await _pipe_writer(stdin_w)
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
