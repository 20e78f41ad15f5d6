"""zlayerctl through a node's REST API: the daemons' clients over HTTP.

:class:`RemoteClient` has the attributes commands use on ``ctl.client.Client``
(``.scheduler``, ``.agent``, ``.registry``, ``.overlay``, ``.proxy``,
``.daemon(name)``), each with the methods and return types of the bus clients
(``ctl.protocols``), so a command runs unchanged against another node. Replies
are the same ``shared.wire`` Structs; a problem document becomes the exception
the bus client raises for the same error (``NotFoundError``, ...) with the same
sentence, so ``ctl.errors.explain`` prints what the local path prints. Job waits
follow the operation's server-sent event stream.

One aiohttp session per command, made at the first request inside the
command's event loop and closed when that loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import tarfile
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, Any, NoReturn, TypeVar
from urllib.parse import quote

import aiohttp
import sdbus

from ctl.client import Client
from ctl.contexts import Target, TargetError, target
from ctl.output import fail
from shared.bus import (
    AlreadyExistsError,
    ConflictError,
    InvalidArgumentError,
    InvalidSpecError,
    NotFoundError,
    NotSupportedError,
    UnavailableError,
    ZLayerError,
)
from shared.busread import BUS_NAMES
from shared.wire import decode, encode
from shared.wire.agent import JobRun, ReplicaInfo
from shared.wire.api import (
    DeployRequest,
    ExecRequest,
    ExecResult,
    LogLine,
    OperationRef,
    PullRequest,
    PushRequest,
    RegistryLogin,
    ScaleRequest,
    SecretInfo,
    SecretValue,
    SecretWrite,
    StopRequest,
    TokenCreate,
    TokenInfo,
    TokenIssued,
)
from shared.wire.daemon import DaemonStatus
from shared.wire.jobs import JobInfo
from shared.wire.overlay import NetworkInfo
from shared.wire.registry import BuildRequest, ImageDetail, ImageInfo, PruneResult
from shared.wire.scheduler import CronSchedule, Deployed, DeploymentStatus, DeployPlan, Event
from shared.wire.traffic import DnsRecord, RouteInfo, ServiceStats

T = TypeVar("T")

API_PREFIX = "/api/v1"
CONNECT_TIMEOUT = 15.0
READ_BUFFER = 1 << 22  # one SSE data line holds a whole JobInfo (a deployment's status)
ONLY_ON_THE_NODE = (
    "{what} works only on the node itself (it hands the daemons local files); "
    "run it there, without --host or ZLAYER_HOST"
)


# A failure of the API itself (unreachable, TLS, token, rate limit): one sentence, which
# ctl.errors prints as it prints any ZLayer error (sdbus allows one class per error name).
ApiError = ZLayerError


_BY_STATUS: dict[int, type[ZLayerError]] = {
    400: InvalidArgumentError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidSpecError,
    501: NotSupportedError,
    503: UnavailableError,
}
# a problem's type may name the bus error exactly (a URN ending in its name)
_BY_NAME: dict[str, type[ZLayerError]] = {
    "NotFound": NotFoundError,
    "InvalidSpec": InvalidSpecError,
    "InvalidArgument": InvalidArgumentError,
    "AlreadyExists": AlreadyExistsError,
    "Conflict": ConflictError,
    "Unavailable": UnavailableError,
    "NotSupported": NotSupportedError,
}


# apid's detail for a daemon missing from its bus (ctl.errors' sentence for it)
_NOT_ON_THE_BUS = re.compile(r"zlayer-(\w+) is not on the bus")


def _ssl_context(found: Target) -> ssl.SSLContext | bool:
    if not found.host.startswith("https:"):
        return False
    try:
        return ssl.create_default_context(cafile=found.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(
            f"the CA file {found.ca_file} cannot be used ({exc}); give a PEM certificate"
        ) from None


class Http:
    """The command's session with the API, and how its failures read."""

    def __init__(self, found: Target) -> None:
        self.target = found
        self.base = found.host
        self._session: aiohttp.ClientSession | None = None
        self._closer: AsyncIterator[None] | None = None

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": "zlayerctl"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        if extra:
            headers.update(extra)
        return headers

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self.target))
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT
                ),
                read_bufsize=READ_BUFFER,
            )
            # closed when the command's event loop ends: asyncio.run closes every live
            # async generator then (shutdown_asyncgens), and awaits this one's finally
            self._closer = _close_at_end(self._session)
            await anext(self._closer)
        return self._session

    def url(self, path: str) -> str:
        return f"{self.base}{API_PREFIX}{path}"

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        body: object = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to ``method path`` (under /api/v1) once its status is a success."""
        session = await self.session()
        extra = dict(headers or {})
        if body is not None:
            data = encode(body)
            extra.setdefault("Content-Type", "application/json")
        try:
            async with session.request(
                method, self.url(path), params=params, data=data, headers=self._headers(extra)
            ) as response:
                if response.status >= 400:
                    await self.fail(response)
                yield response
        except aiohttp.ClientError as exc:
            raise self.unreachable(exc) from None

    async def call(self, method: str, path: str, **kwargs: Any) -> bytes:
        async with self.request(method, path, **kwargs) as response:
            return await response.read()

    async def get(self, path: str, kind: type[T], **kwargs: Any) -> T:
        return decode(await self.call("GET", path, **kwargs), kind)

    def unreachable(self, exc: BaseException) -> ApiError:
        """The sentence for a connection that failed before any answer."""
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return ApiError(
                f"the TLS certificate of {self.base} is not trusted "
                f"({exc.certificate_error}); give its CA with --ca-file "
                "(`zlayerctl context add NAME --host URL --ca-file FILE`)"
            )
        if isinstance(exc, aiohttp.ClientSSLError):
            return ApiError(
                f"the TLS handshake with {self.base} failed ({exc}); check the URL's "
                "port and that the API serves TLS there"
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            error = exc.os_error
            # asyncio's "Connect call failed (...)" for a refused connection names no errno
            why = os.strerror(error.errno) if error.errno else "connection refused"
            if not error.errno and not str(error).startswith("Connect call failed"):
                why = error.strerror or str(error)
            return ApiError(
                f"cannot reach the ZLayer API at {self.base} ({why.lower()}); "
                "check the address and that zlayer-apid runs there"
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return ApiError(
                f"the ZLayer API at {self.base} closed the connection before it answered; "
                "try again, and see its journal if it persists"
            )
        if isinstance(exc, aiohttp.ClientResponseError) and exc.status == 101:
            return ApiError(f"the ZLayer API at {self.base} refused the WebSocket ({exc.message})")
        return ApiError(f"the ZLayer API at {self.base} failed: {exc}")

    async def fail(self, response: aiohttp.ClientResponse) -> NoReturn:
        """Raise what an error response means, as the bus client would for the same error."""
        text = (await response.read()).decode("utf-8", errors="replace")
        detail, kind = "", ""
        with contextlib.suppress(ValueError):
            problem = json.loads(text)
            if isinstance(problem, dict):
                detail = str(problem.get("detail") or problem.get("title") or "")
                kind = str(problem.get("type") or "")
        status = response.status
        if status == 401:
            if not self.target.token:
                raise ApiError(
                    f"the API at {self.base} needs a token; set ZLAYER_TOKEN or save one with "
                    f"`zlayerctl context add NAME --host {self.base}`"
                )
            raise ApiError(
                f"the API at {self.base} refused the token: it is expired or revoked; "
                "make a new one with `zlayerctl token create`"
            )
        if status == 403:
            why = f" ({detail.rstrip('.')})" if detail else ""
            raise ApiError(
                f"the API at {self.base} refused this to the token's role{why}; "
                "use a token with a higher role (`zlayerctl token create NAME --role ...`)"
            )
        if status == 429:
            wait = response.headers.get("Retry-After", "a few")
            raise ApiError(
                f"the API at {self.base} is limiting this token's requests; "
                f"try again in {wait} seconds"
            )
        away = _NOT_ON_THE_BUS.match(detail) if status == 503 else None
        if away is not None and away.group(1) in BUS_NAMES:
            # as the bus client raises it, so that commands wait for a restarting daemon
            # as they do on the node (ctl.errors says the same sentence for it)
            raise sdbus.DbusServiceUnknownError(
                f"The name {BUS_NAMES[away.group(1)]} was not provided by any .service files"
            )
        name = kind.rsplit(":", 1)[-1]
        error = _BY_NAME.get(name) or _BY_STATUS.get(status)
        if error is None:
            raise ApiError(detail or f"the API at {self.base} answered {status} {response.reason}")
        raise error(detail or f"the API at {self.base} answered {status} {response.reason}")

    async def operation(self, method: str, path: str, **kwargs: Any) -> int:
        """Start a long operation; its id (a 202 with an OperationRef)."""
        return decode(await self.call(method, path, **kwargs), OperationRef).id

    async def events(
        self, path: str, params: Any = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """A server-sent event stream's events, as (kind, data)."""
        async with self.request(
            "GET", path, params=params, headers={"Accept": "text/event-stream"}
        ) as response:
            kind, data = "", list[bytes]()
            try:
                async for raw in response.content:
                    line = raw.rstrip(b"\r\n")
                    if not line:
                        if kind == "error" and data:  # the source failed: its sentence
                            raise ApiError(str(json.loads(b"\n".join(data))))
                        if data:
                            yield kind or "message", b"\n".join(data)
                        kind, data = "", list[bytes]()
                        continue
                    if line.startswith(b":"):
                        continue  # a heartbeat
                    field, _, value = line.partition(b":")
                    value = value[1:] if value.startswith(b" ") else value
                    if field == b"event":
                        kind = value.decode()
                    elif field == b"data":
                        data.append(value)
            except aiohttp.ClientError as exc:
                raise self.unreachable(exc) from None


async def _close_at_end(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    """Yield once; close ``session`` when closed (at the end of the event loop)."""
    try:
        yield
    finally:
        await session.close()


def _path(*parts: str) -> str:
    return "".join("/" + quote(part, safe="") for part in parts)


class RemoteDaemon:
    """What every daemon answers, through ``GET /daemons``."""

    def __init__(self, http: Http, name: str) -> None:
        self.http = http
        self.name = name

    async def status(self) -> DaemonStatus:
        for found in await self.http.get("/daemons", list[DaemonStatus]):
            if found.name == self.name:
                return found
        raise UnavailableError(f"zlayer-{self.name} is not on the bus of {self.http.base}")

    async def ping(self) -> None:
        await self.status()


class RemoteJobs(RemoteDaemon):
    """A daemon's jobs, as the API's operations."""

    operations = ""  # the OperationRef daemon name

    async def get_job(self, job_id: int) -> JobInfo:
        return await self.http.get(_path("operations", self.operations, str(job_id)), JobInfo)

    async def cancel_job(self, job_id: int) -> None:
        await self.http.call("POST", _path("operations", self.operations, str(job_id), "cancel"))

    async def run_job(
        self,
        start: Callable[[], Awaitable[int]],
        on_progress: Callable[[JobInfo], None] | None = None,
    ) -> JobInfo:
        """Start a job with ``start`` and wait for its end, as the bus client's run_job:
        ``on_progress`` gets each JobInfo the operation's stream sends."""
        job_id = await start()
        info = await self.get_job(job_id)
        if on_progress is not None and info.state == "running":
            on_progress(info)
        path = _path("operations", self.operations, str(job_id), "stream")
        while info.state == "running":
            async with contextlib.aclosing(self.http.events(path)) as stream:
                async for _kind, data in stream:
                    info = decode(data, JobInfo)
                    if info.state != "running":
                        break
                    if on_progress is not None:
                        on_progress(info)
            if info.state == "running":  # the stream ended early (apid restarted): ask
                info = await self.get_job(job_id)
        if on_progress is not None:
            on_progress(info)
        return info


class RemoteScheduler(RemoteJobs):
    operations = "scheduler"

    def __init__(self, http: Http) -> None:
        super().__init__(http, "schedd")

    async def deploy(self, spec_text: str, filename: str, host_env: Mapping[str, str]) -> Deployed:
        request = DeployRequest(spec=spec_text, filename=filename, env=dict(host_env))
        return decode(await self.http.call("POST", "/deployments", body=request), Deployed)

    async def plan(self, spec_text: str, filename: str, host_env: Mapping[str, str]) -> DeployPlan:
        request = DeployRequest(spec=spec_text, filename=filename, env=dict(host_env))
        reply = await self.http.call(
            "POST", "/deployments", params={"dry_run": "true"}, body=request
        )
        return decode(reply, DeployPlan)

    async def down(self, deployment: str) -> int:
        return await self.http.operation("DELETE", _path("deployments", deployment))

    async def stop(self, deployment: str, service: str, timeout_sec: float, force: bool) -> int:
        request = StopRequest(service=service, timeout=timeout_sec, force=force)
        return await self.http.operation(
            "POST", _path("deployments", deployment, "stop"), body=request
        )

    async def scale(self, deployment: str, service: str, replicas: int) -> int:
        return await self.http.operation(
            "POST",
            _path("deployments", deployment, "services", service, "scale"),
            body=ScaleRequest(replicas=replicas),
        )

    async def list_deployments(self) -> list[DeploymentStatus]:
        return await self.http.get("/deployments", list[DeploymentStatus])

    async def get_deployment(self, deployment: str) -> DeploymentStatus:
        return await self.http.get(_path("deployments", deployment), DeploymentStatus)

    async def trigger_job(self, deployment: str, service: str) -> JobRun:
        reply = await self.http.call(
            "POST", _path("jobs", service, "trigger"), params={"deployment": deployment}
        )
        return decode(reply, JobRun)

    async def list_cron(self, deployment: str) -> list[CronSchedule]:
        found = await self.http.get("/cron", list[CronSchedule])
        return [c for c in found if not deployment or c.deployment == deployment]

    async def rollback(self, deployment: str) -> int:
        reply = json.loads(
            await self.http.call("POST", _path("deployments", deployment, "rollback"))
        )
        # the revision rolled back to, as Rollback answers it (or inside the reply)
        if isinstance(reply, dict):
            return int(reply.get("revision") or reply.get("id") or 0)
        return int(reply)

    async def list_events(self, deployment: str, limit: int) -> list[Event]:
        path = _path("deployments", deployment, "events") if deployment else "/events"
        return await self.http.get(
            path, list[Event], params={"limit": str(limit)}, headers={"Accept": "application/json"}
        )

    async def events(self) -> AsyncIterator[Event]:
        """Every Event from now on (the API's event stream)."""
        async for _kind, data in self.http.events("/events"):
            yield decode(data, Event)

    # secrets and cron switches (ctl.secret_cmd, ctl.cron_cmd call them by Protocol)

    async def set_secret(self, name: str, deployment: str, value: str) -> SecretInfo:
        request = SecretWrite(name=name, value=value, deployment=deployment)
        return decode(await self.http.call("POST", "/secrets", body=request), SecretInfo)

    async def list_secrets(self) -> list[SecretInfo]:
        return await self.http.get("/secrets", list[SecretInfo])

    async def get_secret(self, name: str, deployment: str) -> SecretValue:
        return await self.http.get(
            _path("secrets", name), SecretValue, params={"deployment": deployment}
        )

    async def remove_secret(self, name: str, deployment: str) -> None:
        await self.http.call("DELETE", _path("secrets", name), params={"deployment": deployment})

    async def set_cron_enabled(self, deployment: str, service: str, enabled: bool) -> None:
        switch = "enable" if enabled else "disable"
        await self.http.call(
            "PUT", _path("cron", service, switch), params={"deployment": deployment}
        )


class RemoteAgent(RemoteDaemon):
    def __init__(self, http: Http) -> None:
        super().__init__(http, "agentd")
        self._seen: dict[str, ReplicaInfo] = {}

    async def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]:
        # every replica, filtered here: as agentd's ListReplicas, an unknown deployment or
        # service has none (the service's own route would answer 404)
        found = [
            r
            for r in await self.http.get("/containers", list[ReplicaInfo])
            if (not deployment or r.deployment == deployment)
            and (not service or r.service == service)
        ]
        self._seen.update((r.id, r) for r in found)
        return found

    async def log_paths(self, replica: str) -> list[str]:
        raise ApiError(ONLY_ON_THE_NODE.format(what="reading a replica's log files"))

    async def _replica(self, replica: str) -> ReplicaInfo:
        found = self._seen.get(replica)
        if found is None:
            await self.list_replicas()
            found = self._seen.get(replica)
        if found is None:
            raise NotFoundError(f"replica {replica} not found")
        return found

    async def exec(
        self, replica: str, argv: list[str], tty: bool, stdin: int, stdout: int, stderr: int
    ) -> int:
        """Run ``argv`` in ``replica`` and return its exit code: with a terminal over the
        exec WebSocket (``stdin`` in raw mode), else one POST whose output is written to
        ``stdout`` and ``stderr``."""
        if not tty and _has_input(stdin):
            # the exec route's POST has no stdin, and its WebSocket no way to end one
            raise ApiError(
                "exec through the API does not forward standard input, and some was given; "
                "run it on the node, or put the input in the command (sh -c '...')"
            )
        info = await self._replica(replica)
        path = _path("deployments", info.deployment, "services", info.service, "exec")
        if tty:
            return await exec_terminal(self.http, path + "/ws", info.id, argv, stdin, stdout)
        request = ExecRequest(command=argv, replica=info.id)
        result = decode(await self.http.call("POST", path, body=request), ExecResult)
        for fd, text in ((stdout, result.stdout), (stderr, result.stderr)):
            if text:
                _write_all(fd, text.encode())
        return result.exit_code

    async def list_job_runs(self, deployment: str, service: str) -> list[JobRun]:
        if service:
            services = [service]
        else:  # every job and cron service of the deployment
            status = await self.http.get(_path("deployments", deployment), DeploymentStatus)
            services = [s.name for s in status.services if s.rtype != "service"]
        runs: list[JobRun] = []
        for name in services:
            runs += await self.http.get(
                _path("jobs", name, "executions"),
                list[JobRun],
                params={"deployment": deployment},
            )
        return sorted(runs, key=lambda r: r.started_at, reverse=True)

    async def logs(
        self,
        deployment: str,
        service: str,
        *,
        replica: str = "",
        tail: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[LogLine]:
        """A service's log lines (one replica's with ``replica``), then new ones with ``follow``."""
        params = {"follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = str(tail)
        if replica:
            params["replica"] = replica
        path = _path("deployments", deployment, "services", service, "logs")
        async with self.http.request("GET", path, params=params) as response:
            try:
                async for raw in response.content:
                    if raw.strip():
                        yield decode(raw, LogLine)
            except aiohttp.ClientError as exc:
                raise self.http.unreachable(exc) from None


def _has_input(fd: int, wait: float = 0.1) -> bool:
    """Whether ``fd`` (not a terminal) holds input: a file with bytes left, or a pipe or
    socket with data within ``wait`` seconds (one byte is read: it is not sent anyway)."""
    import select
    import stat

    try:
        found = os.fstat(fd)
        if os.isatty(fd):
            return False
        if stat.S_ISREG(found.st_mode):
            return found.st_size > os.lseek(fd, 0, os.SEEK_CUR)
        if not (stat.S_ISFIFO(found.st_mode) or stat.S_ISSOCK(found.st_mode)):
            return False  # /dev/null and other devices
        readable, _, _ = select.select([fd], [], [], wait)
        return bool(readable) and bool(os.read(fd, 1))
    except OSError:
        return False  # closed or unreadable: nothing to forward


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def exec_terminal(
    http: Http, path: str, replica: str, argv: list[str], stdin: int, stdout: int
) -> int:
    """An interactive exec: ``stdin`` in raw mode to the WebSocket's binary frames, its
    binary frames to ``stdout``; the final text frame carries the exit code."""
    import termios
    import tty

    session = await http.session()
    params = [("command", word) for word in argv] + [("tty", "1"), ("replica", replica)]
    # the size the command's terminal starts with (the runtime reads it once, at its start)
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(stdout if os.isatty(stdout) else stdin)
        params += [("cols", str(size.columns)), ("rows", str(size.lines))]
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        async with session.ws_connect(
            http.url(path), params=params, headers=http._headers(), heartbeat=30
        ) as socket:
            if saved is not None:
                tty.setraw(stdin)
            typed: asyncio.Queue[bytes] = asyncio.Queue()

            def readable() -> None:
                try:
                    chunk = os.read(stdin, 4096)
                except OSError:
                    chunk = b""
                typed.put_nowait(chunk)
                if not chunk:
                    loop.remove_reader(stdin)

            async def pump() -> None:
                while chunk := await typed.get():
                    await socket.send_bytes(chunk)

            loop.add_reader(stdin, readable)
            sender = asyncio.create_task(pump())
            exit_code = 255
            try:
                async for message in socket:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        _write_all(stdout, message.data)
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        exit_code = _exit_code(http, message.data)
                        break
                    elif message.type == aiohttp.WSMsgType.ERROR:
                        break
            finally:
                loop.remove_reader(stdin)
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            return exit_code
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status >= 400:
            raise _handshake_error(http, exc) from None
        raise http.unreachable(exc) from None
    except aiohttp.ClientError as exc:
        raise http.unreachable(exc) from None
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _exit_code(http: Http, text: str) -> int:
    """The exit code the final text frame carries, or what its problem document means."""
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ApiError(f"the API at {http.base} ended the terminal with {text[:200]!r}")
    if isinstance(found.get("exit_code"), int):
        return int(found["exit_code"])
    status = found.get("status")
    detail = str(found.get("detail") or found.get("title") or "the command failed")
    error = _BY_STATUS.get(status, ApiError) if isinstance(status, int) else ApiError
    raise error(detail)


def _handshake_error(http: Http, exc: aiohttp.WSServerHandshakeError) -> ZLayerError:
    if exc.status in (401, 403, 429):
        return ApiError(
            f"the API at {http.base} refused the terminal ({exc.status}); "
            "check the token's role with `zlayerctl token ls`"
        )
    error = _BY_STATUS.get(exc.status, ApiError)
    return error(f"the API at {http.base} refused the terminal: {exc.message}")


class RemoteRegistry(RemoteJobs):
    """registryd through the API: its images, pulls, pushes and builds, followed as the
    API's registry operations."""

    operations = "registry"

    def __init__(self, http: Http) -> None:
        super().__init__(http, "registryd")

    async def import_image(self, path: str, name: str) -> ImageInfo:
        raise ApiError(ONLY_ON_THE_NODE.format(what="`zlayerctl image import` of a local path"))

    async def path_visible(self, path: str, device: int, inode: int) -> bool:
        # Nothing is handed over as a path: build sends its context itself (a tar), and
        # the other commands that name local files say they run only on the node.
        return True

    async def receive(self, fd: int) -> str:
        raise ApiError(ONLY_ON_THE_NODE.format(what="sending local files to registryd"))

    async def list_images(self) -> list[ImageInfo]:
        return await self.http.get("/images", list[ImageInfo])

    async def inspect_image(self, reference: str) -> ImageDetail:
        return await self.http.get(_path("images", reference), ImageDetail)

    async def remove_image(self, reference: str, force: bool) -> list[str]:
        reply = await self.http.call(
            "DELETE", _path("images", reference), params={"force": "true" if force else "false"}
        )
        return decode(reply, list[str])

    async def pull(self, reference: str, pull_policy: str, auth: str) -> int:
        _no_credentials(auth)
        request = PullRequest(reference=reference, pull_policy=pull_policy)
        return await self.http.operation("POST", "/images/pull", body=request)

    async def push(self, reference: str, destination: str, auth: str) -> int:
        _no_credentials(auth)
        request = PushRequest(reference=reference, destination=destination)
        return await self.http.operation("POST", "/images/push", body=request)

    async def login(self, registry: str, username: str, password: str) -> str:
        request = RegistryLogin(registry=registry, username=username, password=password)
        reply = await self.http.call("POST", "/registry/login", body=request)
        with contextlib.suppress(ValueError):
            found = json.loads(reply)
            if isinstance(found, str):
                return found
        return registry

    async def logout(self, registry: str) -> bool:
        try:
            await self.http.call("DELETE", _path("registry", "login", registry))
        except NotFoundError:
            return False
        return True

    async def prune(self) -> PruneResult:
        return decode(await self.http.call("POST", "/system/prune"), PruneResult)

    async def export_image(self, reference: str, fd: int, gzip: bool) -> int:
        raise ApiError(ONLY_ON_THE_NODE.format(what="`zlayerctl export`"))

    async def build(self, request: BuildRequest) -> int:
        """Send the context directory as a tar to ``POST /build`` with the request's
        options; the build job's id (followed like any registryd job)."""
        context = request.context
        params: list[tuple[str, str]] = [("tag", tag) for tag in request.tags]
        for key, value in (("file", request.dockerfile), ("zimagefile", request.zimagefile)):
            if value:
                relative = os.path.relpath(value, context)
                if relative.startswith(".."):
                    raise ApiError(
                        f"{value} is outside the build context {context}; through the API the "
                        "build file must be inside the context, which is all that is sent"
                    )
                params.append((key, relative))
        params += [("build_arg", f"{k}={v}") for k, v in request.build_args.items()]
        for key, value in (
            ("runtime", request.runtime),
            ("target", request.target),
            ("format", request.format),
        ):
            if value:
                params.append((key, value))
        if request.no_cache:
            params.append(("no_cache", "true"))
        with tempfile.TemporaryFile() as archive:
            await asyncio.to_thread(_tar_context, context, archive)
            reply = await self.http.call(
                "POST",
                "/build",
                params=params,
                data=archive,
                headers={"Content-Type": "application/x-tar"},
            )
        return decode(reply, OperationRef).id

    async def push_wasm(self, path: str, reference: str, auth: str, tls_verify: bool) -> int:
        raise ApiError(ONLY_ON_THE_NODE.format(what="`zlayerctl wasm push`"))


def _no_credentials(auth: str) -> None:
    """Credentials for a registry stay on the node: they are never sent with a pull or push."""
    if auth:
        raise ApiError(
            "credentials given on the command line are not sent through the API; "
            "`zlayerctl login` them on the node"
        )


def _tar_context(context: str, archive: IO[bytes]) -> None:
    """The context directory's contents as a tar in ``archive``, rewound to its start."""
    try:
        with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(context, arcname=".")
    except OSError as exc:
        raise ApiError(f"cannot read the build context: {exc.strerror} ({exc.filename})") from None
    archive.seek(0)


class RemoteOverlay(RemoteDaemon):
    def __init__(self, http: Http) -> None:
        super().__init__(http, "overlayd")

    async def get_network(self) -> NetworkInfo:
        return await self.http.get("/overlay/status", NetworkInfo)

    async def list_records(self) -> list[DnsRecord]:
        return await self.http.get("/overlay/dns", list[DnsRecord])


class RemoteProxy(RemoteDaemon):
    def __init__(self, http: Http) -> None:
        super().__init__(http, "proxyd")

    async def list_routes(self) -> list[RouteInfo]:
        return await self.http.get("/proxy/routes", list[RouteInfo])

    async def service_stats(self) -> list[ServiceStats]:
        return await self.http.get("/proxy/stats", list[ServiceStats])


class RemoteTokens:
    """The API's tokens (``/tokens``), as ``shared.clients.ApiClient`` has them on the bus."""

    def __init__(self, http: Http) -> None:
        self.http = http

    async def create_token(self, request: TokenCreate) -> TokenIssued:
        return decode(await self.http.call("POST", "/tokens", body=request), TokenIssued)

    async def list_tokens(self) -> list[TokenInfo]:
        return await self.http.get("/tokens", list[TokenInfo])

    async def revoke_token(self, name: str) -> TokenInfo:
        return decode(await self.http.call("DELETE", _path("tokens", name)), TokenInfo)


class RemoteClient(Client):
    """The daemons of the node ``--host``, ``ZLAYER_HOST`` or the current context names."""

    remote = True

    def __init__(self, paths: object = None, found: Target | None = None) -> None:
        if found is None:
            try:
                found = target()
            except TargetError as exc:
                fail(str(exc))
        if found is None:
            fail("no node's API is named; give --host URL or set ZLAYER_HOST")
        self.http = Http(found)
        self._daemons: dict[str, RemoteDaemon] = {}
        self._scheduler = RemoteScheduler(self.http)
        self._agent = RemoteAgent(self.http)
        self._registry = RemoteRegistry(self.http)
        self._overlay = RemoteOverlay(self.http)
        self._proxy = RemoteProxy(self.http)

    def daemon(self, name: str) -> RemoteDaemon:
        found = self._daemons.get(name)
        if found is None:
            found = self._daemons[name] = RemoteDaemon(self.http, name)
        return found

    @property
    def bus(self) -> Any:
        raise ApiError(ONLY_ON_THE_NODE.format(what="this command"))

    @property
    def scheduler(self) -> RemoteScheduler:
        return self._scheduler

    @property
    def agent(self) -> RemoteAgent:
        return self._agent

    @property
    def registry(self) -> RemoteRegistry:
        return self._registry

    @property
    def overlay(self) -> RemoteOverlay:
        return self._overlay

    @property
    def api(self) -> RemoteTokens:
        return RemoteTokens(self.http)

    @property
    def proxy(self) -> RemoteProxy:
        return self._proxy


def run(coroutine: Callable[[RemoteClient], Awaitable[T]]) -> T:
    """``coroutine(client)`` in an event loop of its own, for the blocking read commands."""

    async def main() -> T:
        return await coroutine(RemoteClient())

    return asyncio.run(main())


class RemoteReader:
    """The read commands' ``shared.busread.BusReader`` calls, through the API."""

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def list_deployments(self) -> list[DeploymentStatus]:
        return run(lambda c: c.scheduler.list_deployments())

    def list_replicas(self, deployment: str, service: str) -> list[ReplicaInfo]:
        return run(lambda c: c.agent.list_replicas(deployment, service))

    def list_routes(self) -> list[RouteInfo]:
        return run(lambda c: c.proxy.list_routes())

    def list_records(self) -> list[DnsRecord]:
        return run(lambda c: c.overlay.list_records())

    def list_images(self) -> list[ImageInfo]:
        return run(lambda c: c.registry.list_images())

    def list_events(self, deployment: str, limit: int) -> list[Event]:
        return run(lambda c: c.scheduler.list_events(deployment, limit))

    def daemons(self) -> list[DaemonStatus]:
        return run(lambda c: c.http.get("/daemons", list[DaemonStatus]))


def explain_remote(exc: BaseException) -> str | None:
    """The sentence for a failure on the remote path, or None to leave it to ctl.errors."""
    if isinstance(exc, TargetError):
        return str(exc)
    return None
