"""The kernel L4 path: which node ports overlayd publishes, to which backends.

From a deployment's :class:`~shared.traffic.DeploymentTraffic` this module
picks the public tcp/udp endpoints that need no userspace
(:func:`~shared.traffic.endpoint_path` says ``l4-kernel``) and turns each
into a :class:`PublishedPort`: a node port, its protocol and the backends'
``address:port`` in rotation. It checks what a push may not do (two
deployments on one port, an address that is not one) and it probes
backends for endpoints that carry a ``stream.health_check``, so that
failing ones leave the nftables map. Rendering the rules is
:mod:`daemons.overlayd.nft`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Literal

from shared import traffic as shared_traffic
from shared.traffic import TrafficError, backend_port, endpoint_path
from shared.wire.traffic import DeploymentTraffic

if TYPE_CHECKING:
    from shared.spec.models import StreamHealthCheck

log = logging.getLogger("zlayer.overlayd")

# Deployment and service names become nft chain names and DNS labels.
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
PROBE_TIMEOUT = 2.0
# Two failures in a row take a backend out; one success brings it back.
PROBE_FAILURES_TO_DROP = 2

L4Protocol = Literal["tcp", "udp"]


class PortConflictError(TrafficError):
    """A node port another deployment already publishes."""


@dataclass(frozen=True)
class Target:
    """One backend of a published port."""

    address: IPv4Address
    port: int
    replica: str

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PublishedPort:
    """A node port DNATed to its backends; ``targets`` before health filtering."""

    deployment: str
    service: str
    endpoint: str
    protocol: L4Protocol
    port: int
    targets: tuple[Target, ...]
    session_timeout: int | None = None  # seconds, udp only
    health_check: StreamHealthCheck | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.protocol, self.port)

    def describe(self) -> str:
        return f"{self.protocol} port {self.port}"


def parse_traffic(deployment: str, text: str) -> DeploymentTraffic:
    """The pushed JSON as a DeploymentTraffic, or a TrafficError saying what is wrong.

    On top of the checks every receiver makes, names must be DNS labels here:
    they become service DNS names.
    """
    traffic = shared_traffic.parse_traffic(deployment, text)
    if not DNS_LABEL.match(deployment):
        raise TrafficError(f"{deployment!r} is not a DNS-safe deployment name")
    for service in traffic.services:
        if not DNS_LABEL.match(service.service):
            raise TrafficError(f"{service.service!r} is not a DNS-safe service name")
    return traffic


def published_ports(traffic: DeploymentTraffic) -> list[PublishedPort]:
    """The kernel-path ports of one deployment, ordered by (protocol, port)."""
    # pydantic and the spec models only once a deployment is pushed
    from pydantic import ValidationError

    from shared.spec.models import EndpointSpec

    ports: dict[tuple[str, int], PublishedPort] = {}
    for service in traffic.services:
        for raw in service.endpoints:
            try:
                endpoint = EndpointSpec.model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise TrafficError(
                    f"an endpoint of {service.service!r} is not valid ({where}: {first['msg']})"
                ) from None
            dumped = endpoint.model_dump(mode="json")
            if endpoint_path(dumped) != "l4-kernel":
                continue
            protocol: L4Protocol = "udp" if endpoint.protocol == "udp" else "tcp"
            stream = endpoint.stream
            timeout = None
            if protocol == "udp" and stream and stream.session_timeout:
                timeout = max(1, round(stream.session_timeout.total_seconds()))
            target_port = backend_port(dumped)
            port = PublishedPort(
                deployment=traffic.deployment,
                service=service.service,
                endpoint=endpoint.name,
                protocol=protocol,
                port=endpoint.port,
                targets=tuple(
                    Target(IPv4Address(b.address), target_port, b.replica) for b in service.backends
                ),
                session_timeout=timeout,
                health_check=stream.health_check if stream else None,
            )
            clash = ports.get(port.key)
            if clash is not None:
                raise TrafficError(
                    f"{clash.service}/{clash.endpoint} and {port.service}/{port.endpoint} "
                    f"both publish {port.describe()}; give one of them another port"
                )
            ports[port.key] = port
    return [ports[key] for key in sorted(ports)]


def check_conflicts(
    deployment: str,
    ports: Iterable[PublishedPort],
    held: Mapping[str, list[PublishedPort]],
) -> None:
    """Refuse a port another deployment publishes."""
    owners = {
        port.key: port for other, list_ in held.items() if other != deployment for port in list_
    }
    for port in ports:
        other_port = owners.get(port.key)
        if other_port is not None:
            raise PortConflictError(
                f"{port.describe()} of {deployment}/{port.service} is already published by "
                f"the deployment {other_port.deployment!r} ({other_port.service}/"
                f"{other_port.endpoint}); give the endpoint another port or remove that one"
            )


# ---------------------------------------------------------------- health probes

ProbeKey = tuple[str, str, str, str]  # deployment, service, endpoint, "address:port"


def probe_key(port: PublishedPort, target: Target) -> ProbeKey:
    return (port.deployment, port.service, port.endpoint, str(target))


def live_targets(port: PublishedPort, down: frozenset[ProbeKey]) -> tuple[Target, ...]:
    """The targets of a port less those its health check took out of rotation."""
    if not down:
        return port.targets
    return tuple(t for t in port.targets if probe_key(port, t) not in down)


async def probe(check: StreamHealthCheck, target: Target) -> bool:
    """One probe of one backend: a TCP connect, or a UDP request and its answer."""
    from shared.spec.models import UdpProbe

    host, port = str(target.address), target.port
    try:
        if isinstance(check, UdpProbe):
            return await asyncio.wait_for(
                _udp_exchange(host, port, check.request.encode(), check.expect), PROBE_TIMEOUT
            )
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    except (OSError, TimeoutError):
        return False


class _OneAnswer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP port unreachable arrives here: nothing listens.
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp_exchange(host: str, port: int, request: bytes, expect: str | None) -> bool:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_OneAnswer, remote_addr=(host, port))
    try:
        transport.sendto(request)
        answer = await protocol.answer
    finally:
        transport.close()
    return expect is None or expect.encode() in answer


class Prober:
    """Probes the backends of published ports that have a stream health check.

    A backend that fails :data:`PROBE_FAILURES_TO_DROP` probes in a row is
    reported down through ``on_change`` (with the deployment whose map must
    be rewritten), and up again after one success.
    """

    def __init__(
        self,
        interval: float,
        on_change: Callable[[str, frozenset[ProbeKey]], Awaitable[None]],
    ) -> None:
        self.interval = interval
        self._on_change = on_change
        self._ports: dict[str, list[PublishedPort]] = {}
        self._failures: dict[ProbeKey, int] = {}
        self.down: dict[str, frozenset[ProbeKey]] = {}
        self._task: asyncio.Task[None] | None = None

    def down_for(self, deployment: str, ports: list[PublishedPort]) -> frozenset[ProbeKey]:
        """What stays out of rotation if ``ports`` replace the deployment's: those of
        its backends already found failing (a new backend counts as up until probed)."""
        keys = {probe_key(p, t) for p in ports if p.health_check is not None for t in p.targets}
        return self.down.get(deployment, frozenset()) & keys

    def set_ports(self, deployment: str, ports: list[PublishedPort]) -> None:
        down = self.down_for(deployment, ports)
        checked = [p for p in ports if p.health_check is not None]
        if checked:
            self._ports[deployment] = checked
        else:
            self._ports.pop(deployment, None)
        keys = {probe_key(p, t) for p in checked for t in p.targets}
        for key in [k for k in self._failures if k[0] == deployment and k not in keys]:
            del self._failures[key]
        if down:
            self.down[deployment] = down
        else:
            self.down.pop(deployment, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-probes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # one bad round must not end probing for good
                log.exception("probing stream backends failed")
            await asyncio.sleep(self.interval)

    async def probe_all(self) -> None:
        jobs: list[tuple[ProbeKey, Awaitable[bool]]] = []
        for ports in self._ports.values():
            for port in ports:
                assert port.health_check is not None
                for target in port.targets:
                    jobs.append((probe_key(port, target), probe(port.health_check, target)))
        if not jobs:
            return
        results = await asyncio.gather(*(job for _, job in jobs))
        changed: set[str] = set()
        for (key, _), ok in zip(jobs, results, strict=True):
            deployment = key[0]
            if deployment not in self._ports:
                continue  # removed while probing
            down = set(self.down.get(deployment, frozenset()))
            if ok:
                self._failures.pop(key, None)
                if key in down:
                    down.discard(key)
                    log.info("%s of %s/%s answers again: back in rotation", key[3], *key[:2])
            else:
                self._failures[key] = self._failures.get(key, 0) + 1
                if self._failures[key] >= PROBE_FAILURES_TO_DROP and key not in down:
                    down.add(key)
                    log.warning(
                        "%s of %s/%s fails its %s health check: out of rotation",
                        key[3],
                        key[0],
                        key[1],
                        key[2],
                    )
            if frozenset(down) != self.down.get(deployment, frozenset()):
                changed.add(deployment)
                if down:
                    self.down[deployment] = frozenset(down)
                else:
                    self.down.pop(deployment, None)
        for deployment in sorted(changed):
            await self._on_change(deployment, self.down.get(deployment, frozenset()))
