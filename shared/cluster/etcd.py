"""etcd for a cluster: how a member is started, how a client reaches the members.

- :class:`EtcdMember` describes one member (name, data directory, client and
  peer URLs, the initial cluster, optional TLS files) and gives the ``etcd``
  command line and environment that run it.
- :func:`client` is an aetcd client over every given endpoint (gRPC tries the
  next address when one stops answering), with mutual TLS when given files.
- :func:`wait_healthy` waits until every endpoint answers a linearizable read,
  which needs an elected leader and a quorum behind it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]

ETCD_BINARY = "etcd"
# Read by wait_healthy; etcd's own health check reads a key of this name too.
HEALTH_KEY = b"health"
# What a call may meet while members come and go (no leader yet, one stopped):
# worth another try on the same or another member until the caller's deadline.
TRANSIENT = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)

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


class Client(aetcd.Client):  # type: ignore[misc]
    """An aetcd client over several endpoints, with mutual TLS when given files."""

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TLSFiles | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(timeout=timeout)
        self._target = _target(endpoints)
        self._tls = tls

    _is_connecting: bool  # aetcd's, set in its __init__

    async def connect(self) -> None:
        # aetcd opens only an insecure channel to one host: the same, over our
        # target. Opening a channel makes no call yet, so it raises no RPC error.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            # Pings find a member that vanished without closing the connection (a
            # node cut off), so calls move on; etcd refuses pings under 5 s apart.
            # gRPC waits up to 2 minutes between reconnects to a member that was
            # away: a member back after a restart is tried again within 2 s.
            options: list[tuple[str, Any]] = [
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
                *self._options.items(),
            ]
            if self._tls is not None and self._tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._tls.server_name))
            if self._tls is None:
                self.channel = grpc.aio.insecure_channel(self._target, options=options)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self._tls.ca.read_bytes(),
                    private_key=self._tls.key.read_bytes(),
                    certificate_chain=self._tls.cert.read_bytes(),
                )
                self.channel = grpc.aio.secure_channel(self._target, credentials, options=options)
            rpc = aetcd.rpc
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def client(
    endpoints: Sequence[str], tls: TLSFiles | None = None, timeout: float | None = None
) -> Client:
    """A client of the members at ``endpoints``; ``timeout`` bounds each call (seconds)."""
    return Client(endpoints, tls, timeout)


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
                async with client([endpoint], tls, timeout=max(0.5, min(2.0, remaining))) as c:
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
