"""Blocking reads from the daemons over D-Bus, without asyncio or sdbus.

zlayerctl's read commands (``ps``, ``status``, ``routes``, ``dns``, ``image
ls``, ``events``) make one call, or one to each daemon, and print. Through
sdbus they would pay for its C module, which imports asyncio (and asyncio
ssl and concurrent.futures), before sending anything: most of their start-up.
So they speak D-Bus through jeepney's blocking connection instead and decode
each reply into the same wire Structs as the typed clients in
``shared.clients`` do. Two calls that are not reads go this way too, as
cheap to send: ``Validate`` (``zlayerctl validate``) and ``Deploy`` for
``zlayerctl up -b``, which waits on nothing after it; and ``Pull``, ``Push``
and ``ExportImage``, whose registryd job ``zlayerctl pull``, ``image push``
and ``export`` wait for by its JobRemoved signal (:meth:`BusReader.subscribe`).
Everything else that changes state, waits on jobs or follows signals stays
on sdbus.

:data:`READS` is the one place that names each read's member and
signatures; ``tests/unit/test_ctl_reads.py`` checks it, the bus names and
the error names here against the sdbus interfaces in ``shared.bus``, so
they cannot drift apart.

Errors: a D-Bus error reply raises :class:`BusError` (its name and
message); a bus that cannot be reached, or that hangs up, raises
:class:`NoBusError`. ``ctl.errors.explain`` turns both into the sentences
it gives for sdbus's exceptions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

    from shared.wire.agent import ReplicaInfo
    from shared.wire.daemon import DaemonStatus
    from shared.wire.jobs import JobInfo
    from shared.wire.registry import ImageInfo
    from shared.wire.scheduler import Deployed, DeploymentStatus, Event, SpecCheck
    from shared.wire.traffic import DnsRecord, RouteInfo

# As shared.bus and shared.paths (which import sdbus and pathlib); the tests hold them equal.
BUS_ADDRESS_ENV = "ZLAYER_BUS_ADDRESS"
PREFIX_ENV = "ZLAYER_PREFIX"
# sd-bus's system bus, where the daemons run under systemd.
SYSTEM_BUS_ENV = "DBUS_SYSTEM_BUS_ADDRESS"
SYSTEM_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"

# Each daemon's bus name, which is also its interface's name.
BUS_NAMES: dict[str, str] = {
    "schedd": "org.zlayer.Scheduler1",
    "agentd": "org.zlayer.Agent1",
    "registryd": "org.zlayer.Registry1",
    "overlayd": "org.zlayer.Overlay1",
    "proxyd": "org.zlayer.Proxy1",
    "apid": "org.zlayer.Api1",
}

# The error names shared.bus raises as ZLayerError subclasses: their message is the sentence.
ZLAYER_ERRORS = frozenset(
    "org.zlayer.Error." + name
    for name in (
        "Failed",
        "NotFound",
        "InvalidSpec",
        "InvalidArgument",
        "AlreadyExists",
        "Conflict",
        "Unavailable",
        "NotSupported",
    )
)
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"

CALL_TIMEOUT = 10 * 60.0  # as zlayerctl's sdbus calls (ctl.client.LONG_CALL_USEC)
AUTH_TIMEOUT = 5.0
VALIDATE_TIMEOUT = 30.0
# schedd's replica list is a cache: a schedd that does not answer soon is left for agentd's
CLUSTER_READ_TIMEOUT = 10.0


class Read:
    """One read method: who answers it, its member name and its signatures.

    A plain class: dataclasses and NamedTuple cost milliseconds to import or make.
    """

    __slots__ = ("daemon", "member", "result", "signature")

    def __init__(self, daemon: str, member: str, signature: str, result: str) -> None:
        self.daemon = daemon  # short name; "" for a member every daemon has
        self.member = member
        self.signature = signature  # the arguments'
        self.result = result  # the reply's


READS: dict[str, Read] = {
    "list_deployments": Read("schedd", "ListDeployments", "", "s"),
    "list_events": Read("schedd", "ListEvents", "su", "s"),
    "list_replicas": Read("agentd", "ListReplicas", "ss", "s"),
    # `ps --containers`: every node's replicas, from schedd (agentd's list if it cannot say)
    "cluster_replicas": Read("schedd", "ListReplicas", "s", "s"),
    "list_images": Read("registryd", "ListImages", "", "s"),
    "list_records": Read("overlayd", "ListRecords", "", "s"),
    "list_routes": Read("proxyd", "ListRoutes", "", "s"),
    "status": Read("", "Status", "", "(sssutsss)"),
    # not a read, but as cheap to send this way: zlayerctl validate need not load the models
    "validate": Read("schedd", "Validate", "ssa{ss}", "s"),
    # `up -b`: one Deploy, whose job it does not wait on
    "deploy": Read("schedd", "Deploy", "ssa{ss}", "s"),
    # `pull` and `image push`: start a registryd job, then wait for its JobRemoved
    "pull": Read("registryd", "Pull", "sss", "t"),
    "push": Read("registryd", "Push", "sss", "t"),
    "get_job": Read("registryd", "GetJob", "t", "s"),
    "cancel_job": Read("registryd", "CancelJob", "t", ""),
    # `export`: the archive's fd goes with the call (a connection opened with enable_fds)
    "export_image": Read("registryd", "ExportImage", "shb", "t"),
}
# registryd's signal at a job's end: (job_id, job_path, JobInfo); a test holds it to shared.bus
JOB_REMOVED = Read("registryd", "JobRemoved", "tos", "")


class BusError(Exception):
    """An error reply from the bus or a daemon: its D-Bus error name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name, message)
        self.name = name
        self.message = message


class NoBusError(Exception):
    """The bus cannot be reached (no socket, refused, not authenticated) or hung up."""


def bus_address(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """The daemons' bus: ``ZLAYER_BUS_ADDRESS``, the private bus's file, or None (system).

    As ``shared.bus.resolve_bus_address(Paths.from_env())``, without pathlib.
    """
    env = os.environ if environ is None else environ
    if env.get(BUS_ADDRESS_ENV):
        return env[BUS_ADDRESS_ENV]
    prefix = env.get(PREFIX_ENV) or "/"
    try:
        with open(os.path.join(prefix, "run", "zlayer", "bus.address")) as handle:
            address = handle.read().strip()
    except OSError:
        return None
    return address or None


def object_path(bus_name: str) -> str:
    return "/" + bus_name.replace(".", "/")


def _missing_socket(address: str) -> str:
    """The socket path of a plain ``unix:path=`` address when nothing is there, else ""
    (an abstract socket, another transport or several addresses: the connection tells)."""
    if ";" in address or not address.startswith("unix:"):
        return ""
    for part in address[len("unix:") :].split(","):
        key, _, value = part.partition("=")
        if key == "path" and value and "%" not in value:  # % escapes: left to jeepney
            return "" if os.path.exists(value) else value
    return ""


class BusReader:
    """One blocking bus connection for the read methods in :data:`READS`."""

    def __init__(self, address: str | None = None, enable_fds: bool = False) -> None:
        """``enable_fds`` for a call that hands the daemon a file descriptor (ExportImage)."""
        if address is None:
            address = os.environ.get(SYSTEM_BUS_ENV) or SYSTEM_BUS_ADDRESS
        missing = _missing_socket(address)
        if missing:  # said before importing jeepney (~15 ms), as the connection would say it
            raise NoBusError(f"no bus socket at {missing}")
        from jeepney.io.blocking import open_dbus_connection

        try:
            self._connection: DBusConnection = open_dbus_connection(
                address, enable_fds=enable_fds, auth_timeout=AUTH_TIMEOUT
            )
        except Exception as exc:
            # no socket, refused, an address jeepney cannot use, authentication or Hello
            # refused: as any failure to open the bus through sdbus, the bus is not there
            raise NoBusError(str(exc)) from exc

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> BusReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def _message(self, read: Read, daemon: str, args: tuple[Any, ...]) -> Any:
        from jeepney import DBusAddress, new_method_call

        bus_name = BUS_NAMES[daemon]
        address = DBusAddress(object_path(bus_name), bus_name, bus_name)
        return new_method_call(address, read.member, read.signature or None, args)

    def call(
        self, name: str, *args: Any, daemon: str = "", timeout: float = CALL_TIMEOUT
    ) -> tuple[Any, ...]:
        """The body of the reply to read ``name`` (a key of READS); BusError for an error."""
        read = READS[name]
        message = self._message(read, daemon or read.daemon, args)
        try:
            reply = self._connection.send_and_get_reply(message, timeout=timeout)
        except TimeoutError:
            raise BusError(NO_REPLY, "Method call timed out") from None
        except OSError as exc:
            raise NoBusError(str(exc)) from exc
        return _body(reply)

    def call_each(
        self, name: str, daemons: list[str], timeout: float
    ) -> dict[str, tuple[Any, ...] | BusError | None]:
        """Read ``name`` from every daemon at once: each reply's body, its error (a bus
        that hung up too), or None for no reply within ``timeout`` seconds."""
        import time

        from jeepney.low_level import HeaderFields

        read = READS[name]
        serials: dict[int, str] = {}
        for daemon in daemons:
            serial = next(self._connection.outgoing_serial)
            try:
                self._connection.send(self._message(read, daemon, ()), serial=serial)
            except OSError as exc:
                raise NoBusError(str(exc)) from exc
            serials[serial] = daemon
        found: dict[str, tuple[Any, ...] | BusError | None] = dict.fromkeys(daemons)
        waiting = set(serials)
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                message = self._connection.receive(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            except OSError as exc:  # the bus hung up: no answer will come
                for daemon in daemons:
                    if found[daemon] is None:
                        found[daemon] = BusError("", str(exc))
                break
            serial = message.header.fields.get(HeaderFields.reply_serial, -1)
            if serial in waiting:
                waiting.discard(serial)
                try:
                    found[serials[serial]] = _body(message)
                except BusError as exc:
                    found[serials[serial]] = exc
        return found

    # ------------------------------------------------------------ typed reads
    # Each returns what the typed client's method of the same name in
    # shared.clients returns; the tests hold the two to the same type.

    def list_deployments(self) -> list[DeploymentStatus]:
        from shared.wire import decode
        from shared.wire.scheduler import DeploymentStatus

        return decode(self.call("list_deployments")[0], list[DeploymentStatus])

    def list_events(self, deployment: str, limit: int) -> list[Event]:
        from shared.wire import decode
        from shared.wire.scheduler import Event

        return decode(self.call("list_events", deployment, limit)[0], list[Event])

    def list_replicas(self, deployment: str = "", service: str = "") -> list[ReplicaInfo]:
        """Every node's replicas (schedd's list), or this node's (agentd's) when schedd
        cannot say: down, an older schedd without the method, or failing."""
        from shared.wire import decode
        from shared.wire.agent import ReplicaInfo

        try:
            found = self.cluster_replicas(deployment)
        except BusError:
            return decode(self.call("list_replicas", deployment, service)[0], list[ReplicaInfo])
        return [r for r in found if not service or r.service == service]

    def cluster_replicas(self, deployment: str = "") -> list[ReplicaInfo]:
        from shared.wire import decode
        from shared.wire.agent import ReplicaInfo

        reply = self.call("cluster_replicas", deployment, timeout=CLUSTER_READ_TIMEOUT)
        return decode(reply[0], list[ReplicaInfo])

    def list_images(self) -> list[ImageInfo]:
        from shared.wire import decode
        from shared.wire.registry import ImageInfo

        return decode(self.call("list_images")[0], list[ImageInfo])

    def list_records(self) -> list[DnsRecord]:
        from shared.wire import decode
        from shared.wire.traffic import DnsRecord

        return decode(self.call("list_records")[0], list[DnsRecord])

    def list_routes(self) -> list[RouteInfo]:
        from shared.wire import decode
        from shared.wire.traffic import RouteInfo

        return decode(self.call("list_routes")[0], list[RouteInfo])

    def deploy(self, spec_text: str, filename: str, host_env: dict[str, str]) -> Deployed:
        from shared.wire import decode
        from shared.wire.scheduler import Deployed

        return decode(self.call("deploy", spec_text, filename, host_env)[0], Deployed)

    def validate(self, spec_text: str, filename: str, host_env: dict[str, str]) -> SpecCheck:
        """As the typed client's; a schedd that does not answer in VALIDATE_TIMEOUT is
        a NoReply BusError (zlayerctl then checks the file itself)."""
        from shared.wire import decode
        from shared.wire.scheduler import SpecCheck

        reply = self.call("validate", spec_text, filename, host_env, timeout=VALIDATE_TIMEOUT)
        return decode(reply[0], SpecCheck)

    def pull(self, reference: str, pull_policy: str, auth: str) -> int:
        job_id: int = self.call("pull", reference, pull_policy, auth)[0]
        return job_id

    def push(self, reference: str, destination: str, auth: str) -> int:
        job_id: int = self.call("push", reference, destination, auth)[0]
        return job_id

    def get_job(self, job_id: int) -> JobInfo:
        from shared.wire import decode
        from shared.wire.jobs import JobInfo

        return decode(self.call("get_job", job_id)[0], JobInfo)

    def cancel_job(self, job_id: int) -> None:
        self.call("cancel_job", job_id)

    def export_image(self, reference: str, fd: int, gzip: bool) -> int:
        job_id: int = self.call("export_image", reference, fd, gzip)[0]
        return job_id

    def subscribe(
        self,
        signal: Read,
        path: str = "",
        interface: str = "",
        queue: Any = None,
        confirm: bool = True,
    ) -> Any:
        """A deque (``queue``, or a new one) that the messages of ``signal`` (from its
        daemon, at its object or ``path``, of its interface or ``interface``) land in while
        :meth:`wait` or any call reads the connection; the bus sends them from when this
        returns. Without ``confirm`` the bus's answer is not waited for: it handles this
        connection's messages in order, so the match holds for anything a later call
        makes the daemon send (one round trip fewer; a refused match goes unseen)."""
        from collections import deque

        from jeepney import MatchRule
        from jeepney.bus_messages import message_bus

        bus_name = BUS_NAMES[signal.daemon]
        fields = {
            "type": "signal",
            "interface": interface or bus_name,
            "member": signal.member,
            "path": path or object_path(bus_name),
        }
        # The bus matches the sender by its well-known name; the messages carry the owner's
        # unique name, so the filter here leaves the sender out.
        rule = MatchRule(sender=bus_name, **fields)
        if queue is None:
            queue = deque()
        self._connection.filter(MatchRule(**fields), queue=queue)
        try:
            if not confirm:
                self._connection.send(message_bus.AddMatch(rule))
                return queue
            _body(self._connection.send_and_get_reply(message_bus.AddMatch(rule), timeout=10.0))
        except TimeoutError:
            raise BusError(NO_REPLY, "Method call timed out") from None
        except OSError as exc:
            raise NoBusError(str(exc)) from exc
        return queue

    def wait(self, queue: Any, timeout: float) -> tuple[str, tuple[Any, ...]]:
        """The member and body of the next message in a :meth:`subscribe` deque;
        TimeoutError after ``timeout`` seconds without one."""
        from jeepney.low_level import HeaderFields

        try:
            message = self._connection.recv_until_filtered(queue, timeout=timeout)
        except TimeoutError:
            raise  # the caller's to handle, not a bus that hung up
        except OSError as exc:
            raise NoBusError(str(exc)) from exc
        return message.header.fields.get(HeaderFields.member, ""), tuple(message.body)

    def statuses(
        self, daemons: list[str], timeout: float
    ) -> dict[str, DaemonStatus | BusError | None]:
        """Every named daemon's Status at once: its DaemonStatus, the error it or the
        bus answered, or None when it did not answer within ``timeout`` seconds."""
        from shared.wire.daemon import DaemonStatus

        found: dict[str, DaemonStatus | BusError | None] = {}
        for daemon, body in self.call_each("status", daemons, timeout).items():
            if isinstance(body, tuple):
                try:
                    found[daemon] = DaemonStatus.from_dbus(body[0])
                except (TypeError, ValueError, IndexError) as exc:
                    found[daemon] = BusError("", f"not a Status reply: {exc}")
            else:
                found[daemon] = body
        return found


def _body(message: Any) -> tuple[Any, ...]:
    """A reply's body, or BusError for an error reply."""
    from jeepney.low_level import HeaderFields, MessageType

    if message.header.message_type is MessageType.error:
        name = message.header.fields.get(HeaderFields.error_name, "")
        body = message.body
        text = body[0] if body and isinstance(body[0], str) else ""
        raise BusError(name, text)
    body = message.body
    return tuple(body)
