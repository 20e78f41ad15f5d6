"""etcd for a cluster: how a member is started, how a client reaches the members.

- :class:`EtcdMember` describes one member (name, data directory, client and
  peer URLs, the initial cluster, optional TLS files) and gives the ``etcd``
  command line and environment that run it.
- :func:`client` is an aetcd client over every given endpoint, with mutual TLS
  when given files. It uses one member at a time and moves to the next when a
  call is not answered within ATTEMPT_TIMEOUT (a member gone without closing its
  connections holds a call until keepalive, 15 s, otherwise), and it follows the
  members' client URLs as etcd lists them (a running node reaches voters that
  joined after it started). Its TLS files are read in a thread at connect() and
  kept for every member's channel; a channel made later reads them again only
  when their modification times changed (certificates are renewed in place).
- :func:`wait_healthy` waits until every endpoint answers a linearizable read,
  which needs an elected leader and a quorum behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]

from shared.cluster import filestamp

ETCD_BINARY = "etcd"
# Read by wait_healthy; etcd's own health check reads a key of this name too.
HEALTH_KEY = b"health"
# What a call may meet while members come and go (no leader yet, one stopped):
# worth another try on the same or another member until the caller's deadline.
TRANSIENT = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)
# One try of a call waits this long for one member before the next is tried: etcd
# answers in milliseconds, and a member that stopped answering without closing its
# connections (a host cut off, a frozen process) would otherwise hold each call until
# its deadline, and gRPC's channel would keep choosing it (pick_first) after that.
ATTEMPT_TIMEOUT = 2.0
# Seconds between looks at the members' client URLs (MemberList), so a running client
# reaches members that joined after it started and forgets removed ones; each look is
# also a call, so a member gone quiet under a client that only watches is left.
FOLLOW_EVERY = 5.0
# A call every member failed goes round them again after ROUND_PAUSE seconds (up to
# its deadline, or ROUNDS times without one): a leader election after a member left
# holds every member's answer for a second or two.
ROUNDS = 3
ROUND_PAUSE = 0.25
# Seconds between looks whether the TLS files changed (the node's certificate renewed
# in place): the channels made with the old ones are then retired, because a channel
# keeps its credentials for every reconnect, and the old certificate expires months
# after a renewal while a client may run longer.
TLS_LOOK_EVERY = 60.0
# A call ending so on a member is tried on the next one.
MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Calls not sent twice when the first try's fate is unknown (a member that did not
# answer in time may still make it): changes of the cluster's members, and
# transactions, whose guard would fail on the second try of one that was applied
# (the caller would read that as a conflict and apply its change again). They wait
# their whole deadline on one member; a refused one still goes to the next.
ONCE = frozenset({"MemberAdd", "MemberRemove", "MemberUpdate", "MemberPromote", "Txn"})
# Streaming methods: each is sent to the member in use, once.
STREAMS = frozenset({"LeaseKeepAlive", "Snapshot"})

log = logging.getLogger("zlayer.cluster.etcd")

T = TypeVar("T")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA that signs the other side's certificate, our certificate, its key."""

    ca: Path
    cert: Path
    key: Path
    # The name a client checks in the members' certificates instead of the
    # target's: a target of several addresses is no one host name, so a name
    # every member's certificate carries (the cluster's, see shared.cluster.pki).
    server_name: str | None = None


@dataclass(frozen=True)
class _TLSRead:
    """A client's TLS files as read, with their modification times when they were."""

    stamp: tuple[int, ...]  # st_mtime_ns of the CA, the certificate, the key
    credentials: Any  # grpc.ChannelCredentials, made once for every channel


def _read_tls(files: TLSFiles, known: _TLSRead | None) -> _TLSRead:
    """The files' credentials: ``known`` while no file changed since, or while one
    changed too recently to be sure a renewal has written both key and certificate
    (:mod:`shared.cluster.filestamp`); else read again.

    Blocking; in a thread from async code.
    """
    stamp = filestamp.stamp(files.ca, files.cert, files.key)
    if known is not None and (known.stamp == stamp or not filestamp.settled(stamp)):
        return known
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files.ca.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )
    return _TLSRead(stamp, credentials)


@dataclass(frozen=True)
class EtcdMember:
    """One etcd member: what it is called, where it keeps its data, where it listens."""

    name: str
    data_dir: Path
    client_urls: tuple[str, ...]
    peer_urls: tuple[str, ...]
    # Every member at the start, name -> its peer URLs (comma-separated if several).
    initial_cluster: Mapping[str, str]
    initial_state: Literal["new", "existing"] = "new"
    cluster_token: str = "zlayer"
    client_tls: TLSFiles | None = None
    peer_tls: TLSFiles | None = None
    # Where other nodes reach it; the listen URLs when not set.
    advertise_client_urls: tuple[str, ...] = ()
    advertise_peer_urls: tuple[str, ...] = ()
    # History older than this is compacted: etcd otherwise keeps every version of
    # every key until its 2 GiB quota fills, and then refuses all writes.
    compaction_retention: str = "1h"
    binary: str = ETCD_BINARY
    extra_args: tuple[str, ...] = field(default=())

    def argv(self) -> list[str]:
        """The ``etcd`` command line that runs this member."""
        args = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            ",".join(self.client_urls),
            "--advertise-client-urls",
            ",".join(self.advertise_client_urls or self.client_urls),
            "--listen-peer-urls",
            ",".join(self.peer_urls),
            "--initial-advertise-peer-urls",
            ",".join(self.advertise_peer_urls or self.peer_urls),
            "--initial-cluster",
            ",".join(f"{name}={urls}" for name, urls in self.initial_cluster.items()),
            "--initial-cluster-state",
            self.initial_state,
            "--initial-cluster-token",
            self.cluster_token,
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            self.compaction_retention,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        if self.client_tls is not None:
            args += [
                "--trusted-ca-file",
                str(self.client_tls.ca),
                "--cert-file",
                str(self.client_tls.cert),
                "--key-file",
                str(self.client_tls.key),
                "--client-cert-auth",
            ]
        if self.peer_tls is not None:
            args += [
                "--peer-trusted-ca-file",
                str(self.peer_tls.ca),
                "--peer-cert-file",
                str(self.peer_tls.cert),
                "--peer-key-file",
                str(self.peer_tls.key),
                "--peer-client-cert-auth",
            ]
        return [*args, *self.extra_args]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to run it in: ``base`` (ours) without ETCD_* variables,
        which etcd would otherwise read as settings of its own."""
        source = os.environ if base is None else base
        return {k: v for k, v in source.items() if not k.startswith("ETCD")}


def _target(endpoints: Sequence[str]) -> str:
    """One gRPC target for the endpoints: several IP addresses in one target (the
    channel moves to the next when one stops answering); a host name alone."""
    if not endpoints:
        raise ValueError("no etcd endpoint was given: name at least one (http://HOST:PORT)")
    hosts: list[tuple[str, int]] = []
    for endpoint in endpoints:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if not parts.hostname:
            raise ValueError(f"{endpoint!r} is not an etcd endpoint: write http://HOST:PORT")
        hosts.append((parts.hostname, parts.port or 2379))
    try:
        versions = {ipaddress.ip_address(host).version for host, _ in hosts}
    except ValueError:
        versions = set()
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)
    # gRPC takes several addresses in one target only as IP literals: a name is
    # reached alone (its DNS answer may itself name several members).
    host, port = hosts[0]
    return f"dns:{host}:{port}" if ":" not in host else f"dns:[{host}]:{port}"


class _Stub:
    """One etcd service's stub (KV, Lease, Cluster, Maintenance) whose calls go to the
    member the client uses now, and on to the next member when it does not answer."""

    def __init__(self, owner: Client, service: str) -> None:
        self._owner = owner
        self._service = service

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method in STREAMS:
            return functools.partial(self._owner._stream, self._service, method)
        return functools.partial(self._owner._unary, self._service, method)


class Client(aetcd.Client):  # type: ignore[misc]
    """An aetcd client over several members, with mutual TLS when given files.

    Calls go to one member at a time (the first given, at the start). A call that
    member does not answer within ATTEMPT_TIMEOUT, or refuses as unavailable, is
    tried on the next member (within the call's own timeout), and the client stays
    there; watches on the member left end with an error, so their owners watch
    again. With ``follow`` (seconds) the client takes the members' client URLs
    from etcd at that interval, so it reaches members added after it started.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TLSFiles | None = None,
        timeout: float | None = None,
        *,
        follow: float | None = FOLLOW_EVERY,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        tls_look: float = TLS_LOOK_EVERY,
    ) -> None:
        super().__init__(timeout=timeout)
        for endpoint in endpoints:
            _target([endpoint])  # a sentence for a malformed one, now
        if not endpoints:
            _target(endpoints)
        self._urls = list(dict.fromkeys(endpoints))
        self._current = 0
        self._tls = tls
        self._tls_read: _TLSRead | None = None  # read at connect(), again when they change
        self._tls_look = tls_look
        self._tls_look_at = 0.0  # loop time of the next look whether they changed (connect)
        self._follow = follow
        self._attempt = attempt_timeout
        self._channels: dict[str, Any] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._follower: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()  # watchers being ended, channels closed

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs as the client knows them now; the one in use first."""
        return self._urls[self._current :] + self._urls[: self._current]

    async def connect(self) -> None:
        # Opening a channel makes no call, so this waits for nothing and raises no
        # RPC error: a member that does not answer is found by the first call.
        if self._connected.is_set():
            return
        await self._fresh_tls()
        self._tls_look_at = asyncio.get_running_loop().time() + self._tls_look
        self.kvstub = _Stub(self, "KV")
        self.clusterstub = _Stub(self, "Cluster")
        self.leasestub = _Stub(self, "Lease")
        self.maintenancestub = _Stub(self, "Maintenance")
        self._watcher = self._new_watcher()
        if self._follow:
            self._follower = asyncio.create_task(self._keep_following(), name="etcd-members")
        self._connected.set()

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._watcher is not None:
            await self._watcher.shutdown()
        for task in list(self._ending):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()
        self._init_channel_attrs()
        self._connected.clear()

    # ------------------------------------------------------------ members

    async def _fresh_tls(self) -> None:
        """The TLS files read again if they changed (renewed in place), off the event loop."""
        if self._tls is not None:
            self._tls_read = await asyncio.to_thread(_read_tls, self._tls, self._tls_read)

    async def _before_channel(self) -> None:
        """Before a call on the member in use: its channel, if it has none yet, is made
        with the TLS files as they are now; and every ``tls_look`` seconds a look whether
        they changed, which retires the channels made with the old ones."""
        if self._tls is None:
            return
        now = asyncio.get_running_loop().time()
        if self._urls[self._current] in self._channels and now < self._tls_look_at:
            return
        self._tls_look_at = now + self._tls_look
        before = self._tls_read
        await self._fresh_tls()
        if before is not None and self._tls_read is not before:
            self._retire_channels()

    def _retire_channels(self) -> None:
        """New channels for every call from now on (the TLS files changed): the old ones
        close once their calls end, and the watches on them end, so their owners watch
        again on a new one."""
        if not self._channels:
            return
        log.info("the TLS files changed (a renewed certificate): new connections to etcd")
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            self._later(channel.close(grace=self._attempt + 1))
        self._replace_watcher(
            self._urls[self._current], "the TLS files changed (a renewed certificate)"
        )

    def _channel(self, url: str) -> Any:
        found = self._channels.get(url)
        if found is not None:
            return found
        # Pings find a member that vanished under a stream the client holds (a watch);
        # etcd refuses pings under 5 s apart. gRPC waits up to 2 minutes between
        # reconnects to a member that was away: a member back after a restart is
        # tried again within 2 s.
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            *self._options.items(),
        ]
        target = _target([url])
        if self._tls is None:
            found = grpc.aio.insecure_channel(target, options=options)
        else:
            if self._tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._tls.server_name))
            if self._tls_read is None:  # not connected yet: connect() reads them in a thread
                self._tls_read = _read_tls(self._tls, None)
            found = grpc.aio.secure_channel(target, self._tls_read.credentials, options=options)
        self._channels[url] = found
        return found

    def _stub(self, url: str, service: str) -> Any:
        found = self._stubs.get((url, service))
        if found is None:
            found = self._stubs[url, service] = getattr(aetcd.rpc, f"{service}Stub")(
                self._channel(url)
            )
        return found

    def _new_watcher(self) -> Any:
        # A watch is created within one try's time too (etcd answers at once).
        wait = self._attempt if self._timeout is None else min(self._timeout, self._attempt)
        return aetcd.watcher.Watcher(
            _WatchStub(self, self._urls[self._current]), timeout=wait, metadata=self.metadata
        )

    def _move_on(self, url: str, why: str) -> None:
        """Leave the member at ``url`` for the next one, unless another call already
        has; the watches on it end, so their owners watch again on the next."""
        if len(self._urls) < 2 or self._urls[self._current] != url:
            return
        self._current = (self._current + 1) % len(self._urls)
        log.info(
            "etcd at %s does not answer (%s): calls go to %s", url, why, self._urls[self._current]
        )
        self._replace_watcher(url)

    def _replace_watcher(self, url: str, why: str = "it stopped answering") -> None:
        old, self._watcher = self._watcher, self._new_watcher()
        if old is not None:
            error = aetcd.ConnectionFailedError(
                f"a watch on etcd at {url} ended ({why}); watch again"
            )
            self._later(old._terminate_stream(error))

    def _later(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def set_endpoints(self, urls: Sequence[str]) -> None:
        """Take ``urls`` as the members' client URLs from now on (the one in use kept,
        if listed); channels to members no longer listed close once their calls end."""
        urls = list(dict.fromkeys(urls))
        if not urls or urls == self._urls:
            return
        current = self._urls[self._current]
        self._urls = urls
        if current in urls:
            self._current = urls.index(current)
        else:
            self._current = 0
            self._replace_watcher(current)
        for url in [u for u in self._channels if u not in urls]:
            channel = self._channels.pop(url)
            for key in [k for k in self._stubs if k[0] == url]:
                del self._stubs[key]
            # a call on it ends within its try's time: closing cancels what is left
            self._later(channel.close(grace=self._attempt + 1))
        log.info("etcd's members answer at %s", ", ".join(urls))

    async def members_urls(self) -> list[str]:
        """The members' client URLs, as etcd lists them (a member added but not yet
        started has none)."""
        return sorted({str(u) for m in [m async for m in self.members()] for u in m.client_urls})

    async def _keep_following(self) -> None:
        while True:
            await asyncio.sleep(self._follow or FOLLOW_EVERY)
            try:
                self.set_endpoints(await self.members_urls())
            except (aetcd.ClientError, OSError, TimeoutError) as exc:
                log.debug("cannot list etcd's members now: %s", exc)

    # ------------------------------------------------------------ calls

    async def _unary(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        **kwargs: Any,
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        tried = 0
        while True:
            await self._before_channel()
            url = self._urls[self._current]
            call = getattr(self._stub(url, service), method)
            try:
                wait = timeout if method in ONCE else self._try_time(timeout, deadline, tried)
                return await call(request, timeout=wait, metadata=metadata, **kwargs)
            except grpc.aio.AioRpcError as exc:
                tried += 1
                if not self._again(url, method, exc, tried, deadline):
                    raise
                if tried % len(self._urls) == 0:
                    # every member refused or kept quiet (an election under way, a member
                    # on its way out): a pause before the next round, within the deadline
                    await asyncio.sleep(ROUND_PAUSE)

    def _try_time(self, timeout: float | None, deadline: float | None, tried: int) -> float:
        """How long one try waits: ATTEMPT_TIMEOUT, within the call's deadline; the
        first try at most half the call's time when another member could answer, so
        a short call (a lease's refresh) still has time for the next member."""
        if deadline is None or timeout is None:
            return self._attempt
        wait = min(self._attempt, deadline - asyncio.get_running_loop().time())
        if tried == 0 and len(self._urls) > 1:
            wait = min(wait, timeout / 2)
        return max(0.001, wait)

    def _again(self, url: str, method: str, exc: Any, tried: int, deadline: float | None) -> bool:
        """After a failed try on ``url``: move on if the member did not answer, and
        whether to try the call on the next member."""
        code = exc.code()
        if code not in MOVE_ON:
            return False
        self._move_on(url, exc.details() or code.name)
        return not (
            # without a deadline of its own, each member a few times; with one, until it
            (deadline is None and tried >= ROUNDS * len(self._urls))
            or (deadline is not None and asyncio.get_running_loop().time() >= deadline)
            or (code is grpc.StatusCode.DEADLINE_EXCEEDED and method in ONCE)
        )

    async def _stream(
        self,
        service: str,
        method: str,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """A streaming call on the member in use. A lease's refresh (one request, its
        answer at once) is tried like a unary call; a snapshot is sent once."""
        refresh = method == "LeaseKeepAlive"
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        tried = 0
        while True:
            await self._before_channel()
            url = self._urls[self._current]
            wait = self._try_time(timeout, deadline, tried) if refresh else timeout
            call = getattr(self._stub(url, service), method)(
                request, timeout=wait, metadata=metadata, **kwargs
            )
            answered = False
            try:
                async for reply in call:
                    answered = True
                    yield reply
                return
            except grpc.aio.AioRpcError as exc:
                tried += 1
                again = self._again(url, method, exc, tried, deadline)
                if answered or not refresh or not again:
                    raise
            finally:
                call.cancel()  # a caller that stops at the first reply ends the stream

    async def watch(self, key: bytes, **kwargs: Any) -> Any:
        """aetcd's watch, whose cancel goes to the stream that made it (watch ids
        are a stream's own: another stream's same id is another watch); a watch
        the member in use does not create in time is tried on the next one."""
        await self.connect()
        for tried in range(1, len(self._urls) + 1):
            await self._before_channel()
            watcher, url = self._watcher, self._urls[self._current]
            try:
                return await self._watch_on(watcher, key, **kwargs)
            except aetcd.WatchTimeoutError:
                self._move_on(url, "no watch created in time")
                if tried >= len(self._urls):
                    raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() in MOVE_ON:
                    self._move_on(url, exc.details() or exc.code().name)
                if exc.code() not in MOVE_ON or tried >= len(self._urls):
                    aetcd.exceptions._handle_exception(exc)
        raise AssertionError("not reached")

    async def _watch_on(self, watcher: Any, key: bytes, **kwargs: Any) -> Any:
        events: asyncio.Queue[Any] = asyncio.Queue()

        async def deliver(response: Any) -> None:
            await events.put(response)

        callback = await watcher.add_callback(key, deliver, **kwargs)
        canceled = asyncio.Event()

        async def cancel() -> None:
            canceled.set()
            await events.put(None)
            await watcher.cancel(callback.watch_id)

        async def iterator() -> AsyncIterator[Any]:
            while not canceled.is_set():
                event = await events.get()
                if event is None:
                    canceled.set()
                if isinstance(event, grpc.aio.AioRpcError):
                    canceled.set()
                    aetcd.exceptions._handle_exception(event)
                if isinstance(event, Exception):
                    canceled.set()
                    raise event
                if not canceled.is_set():
                    yield event

        return aetcd.rtypes.Watch(iterator, cancel, callback.watch_id)


class _WatchStub:
    """The Watch service of one member (a watcher's stream stays on the member it
    started on; the client makes a new watcher when it moves on)."""

    def __init__(self, owner: Client, url: str) -> None:
        self._owner = owner
        self._url = url

    def Watch(self, requests: Any, **kwargs: Any) -> Any:  # gRPC's name
        return self._owner._stub(self._url, "Watch").Watch(requests, **kwargs)


def client(
    endpoints: Sequence[str],
    tls: TLSFiles | None = None,
    timeout: float | None = None,
    *,
    follow: float | None = FOLLOW_EVERY,
) -> Client:
    """A client of the members at ``endpoints``; ``timeout`` bounds each call (seconds).
    With ``follow`` it takes the members' URLs from etcd every so many seconds; None
    keeps the ones given (a check of one given member)."""
    return Client(endpoints, tls, timeout, follow=follow)


class EtcdUnhealthyError(TimeoutError):
    """etcd did not answer in time; the message says which endpoints and why."""


async def wait_healthy(
    endpoints: Iterable[str], timeout: float, tls: TLSFiles | None = None
) -> None:
    """Return once every endpoint answers a linearizable read (a leader and a
    quorum); :class:`EtcdUnhealthyError` after ``timeout`` seconds."""
    pending = list(endpoints)
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while pending:
        for endpoint in list(pending):
            remaining = deadline - time.monotonic()
            try:
                limit = max(0.5, min(2.0, remaining))
                async with client([endpoint], tls, timeout=limit, follow=None) as c:
                    await c.get(HEALTH_KEY)
            except (aetcd.ClientError, OSError) as exc:
                last[endpoint] = str(exc) or type(exc).__name__
            else:
                pending.remove(endpoint)
        if not pending:
            return
        if time.monotonic() >= deadline:
            why = "; ".join(f"{e}: {last.get(e, 'no answer')}" for e in pending)
            raise EtcdUnhealthyError(
                f"etcd at {', '.join(pending)} is not healthy after {timeout:g} s ({why}): "
                "check that its members are running and can reach each other"
            )
        await asyncio.sleep(0.1)


async def retrying(call: Callable[[], Awaitable[T]], timeout: float) -> T:
    """``call()``, tried again while etcd answers that it cannot now (a leader
    is being elected, a member stopped) until ``timeout`` seconds have passed;
    then its last error."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return await call()
        except TRANSIENT:
            if time.monotonic() + delay >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


# ------------------------------------------------------------ the member as a service

USAGE = "usage: python -m shared.cluster.etcd run|check"


def main(argv: Sequence[str] | None = None) -> int:
    """``run``: exec this node's etcd member as its cluster.toml says (the unit's
    ExecStart and the supervisor's child: etcd itself then tells either when it
    is ready, over NOTIFY_SOCKET). ``check``: exit 0 if this node runs a member,
    1 if it runs none (the unit's ExecCondition), 255 if cluster.toml is broken."""
    import sys

    from shared.cluster import config
    from shared.paths import Paths

    args = list(sys.argv[1:] if argv is None else argv)
    if args not in (["run"], ["check"]):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        found = config.load(Paths.from_env())
    except config.ClusterConfigError as exc:
        print(exc, file=sys.stderr)
        # EX_CONFIG: a restart will not help. As the unit's ExecCondition, 255: systemd
        # skips a unit quietly on 1 to 254, and a broken file must fail it, visibly.
        return 255 if args == ["check"] else 78
    member = config.member(found) if found is not None else None
    if args == ["check"]:
        return 0 if member is not None else 1
    if member is None:
        print(
            "this node runs no etcd member (no [etcd] in its cluster.toml); "
            "zlayerctl node init or node join makes one",
            file=sys.stderr,
        )
        return 78
    member.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv_ = member.argv()
    binary = shutil.which(argv_[0]) or argv_[0]
    os.execve(binary, argv_, member.env())
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
