"""gRPC between nodes: the ``zlayer.Node1`` service, its server and its clients.

No protoc: the methods are grpcio generic handlers whose messages are the
msgspec Structs of :mod:`shared.wire.cluster`, as JSON (``shared.wire``'s
encode and decode). Everything is asynchronous (``grpc.aio``).

A node's server listens on two ports, both TLS with the node's certificate:

- the **peer port**, mutual TLS: a client must present a certificate the
  cluster CA signed, or the handshake fails. Every method but Join needs this.
- the **join port**, server TLS only: a node that joins has no certificate
  yet. grpcio's server either requires and verifies client certificates or
  does not ask for them (there is no "verify if presented"), so this one
  port does not ask, and answers only Join; any other method there is
  refused. It sends the CA certificate after its own, so a joining node can
  check it against the token's fingerprint.

``Join`` (:func:`join`): the new node opens TLS to the join port without
trusting anything, takes the chain the server shows, and goes on only if it
holds the CA whose SHA-256 the token carries. It then connects again with
that CA as its only root (so the server must hold a certificate of that CA
for the address in the token), sends the token's secret and a certificate
request, and gets back its certificate, the CA certificate, the etcd
endpoints and the cluster's secrets key (:mod:`shared.cluster.secretkey`).
The secret never leaves before the server has proved itself, and the key
never leaves the server before the token's secret was checked.

A server given a ``gate`` (:class:`shared.cluster.trust.Trust`'s ``refusal``) asks
it about each caller on the peer port before any method runs: a node removed
from the cluster (its certificate revoked) or unknown to it is refused with
PERMISSION_DENIED and the gate's sentence, though its certificate still
verifies.

``Renew`` signs a new certificate for the calling node, of its own id only (peer
port, a node that holds the CA; :func:`renew` calls it).

``Ping`` answers the node's id and the caller's id as its certificate says.

Where a node is dialled (:func:`peer_address`): at its advertised address, or,
for a node the others cannot reach first (behind NAT, its record not
``reachable``), at its mesh address, the gateway of its block, which its
WireGuard interface holds: the call goes through the caller's mesh interface
and the tunnel the NAT'd node keeps open with its keepalives. Either way the
server's certificate must name the node's id (``expect_node``), not the
address. schedd's server listens on the peer port on every address of the
node (:func:`wildcard`), so calls through the mesh arrive: the mesh address
may not exist yet when the server starts and moves with the node's block,
and gRPC takes no new port on a running server. That widens nothing: mutual
TLS refuses a caller without a certificate of the cluster's CA and the gate a
removed or unknown node, on every address alike. The join port stays on the
advertised address.

``Logs``, ``Exec`` and ``Stats`` reach a replica of the answering node
(:mod:`shared.cluster.remote` serves and calls them): server streaming
(:func:`streaming`) and bidirectional (:func:`duplex`) handlers, peer port
only. A ZLayer error the answering node raises travels as its class name in
the trailing metadata (``zlayer-error``) and comes back as the same class.

Refusals are gRPC statuses whose details are one sentence; the clients here
raise them as :class:`PeerError` with that sentence.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote

import grpc  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from shared.bus import ERRORS, ZLayerError
from shared.cluster import filestamp, jointoken, pki, secretkey
from shared.cluster.jointoken import JoinToken, JoinTokenError
from shared.wire import Wire, WireError, decode, encode
from shared.wire.cluster import (
    KEYS,
    JoinReply,
    JoinRequest,
    JoinTokenRecord,
    NodeRecord,
    PingReply,
    PingRequest,
    RenewReply,
    RenewRequest,
)

SERVICE = "zlayer.Node1"
JOIN = f"/{SERVICE}/Join"
PING = f"/{SERVICE}/Ping"
LOGS = f"/{SERVICE}/Logs"
EXEC = f"/{SERVICE}/Exec"
STATS = f"/{SERVICE}/Stats"
RENEW = f"/{SERVICE}/Renew"
ERROR_KEY = "zlayer-error"  # trailing metadata: the class of the ZLayer error raised
DEFAULT_TIMEOUT = 10.0

Request = TypeVar("Request", bound=Wire)
Reply = TypeVar("Reply", bound=Wire)


class PeerError(RuntimeError):
    """A call to another node that failed, in one sentence."""


class JoinRefusedError(Exception):
    """Raised by a :class:`JoinDesk` to refuse a node; the message is the sentence it is told."""


class JoinDesk(Protocol):
    """What the node that answers joins asks the cluster (etcd, in a real cluster)."""

    async def token(self, secret_sha256: str) -> JoinTokenRecord | None:
        """The record under ``KEYS["join_tokens"] + secret_sha256``, if there is one."""

    async def admit(self, node_id: str, request: JoinRequest) -> list[str]:
        """Called with a good secret, once the request is signed and before the
        certificate is sent: raise :class:`JoinRefusedError` to refuse (an id already
        in the cluster); the etcd client URLs to give the new node."""


@runtime_checkable
class Ledger(Protocol):
    """A desk that keeps each certificate it lets the CA sign (for revocation)."""

    async def issued(self, certificate: x509.Certificate) -> None: ...


# Asked about each caller on the peer port: why it is refused, or None.
Gate = Callable[[str], Awaitable[str | None]]


class EtcdJoinDesk:
    """A :class:`JoinDesk` over etcd (an aetcd client): tokens from ``KEYS["join_tokens"]``,
    an id already under ``KEYS["nodes"]`` refused, the members' client URLs given out."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def token(self, secret_sha256: str) -> JoinTokenRecord | None:
        return await jointoken.load(self.client, secret_sha256)

    async def admit(self, node_id: str, request: JoinRequest) -> list[str]:
        if await self.client.get((KEYS["revoked"] + node_id).encode()) is not None:
            raise JoinRefusedError(
                f"node {node_id} was removed from the cluster; join under another id"
            )
        if await self.client.get((KEYS["nodes"] + node_id).encode()) is not None:
            raise JoinRefusedError(
                f"a node with the id {node_id} is already in the cluster; remove it first "
                f"(zlayerctl node rm {node_id}) or join under another id"
            )
        return [url async for member in self.client.members() for url in member.client_urls]

    async def issued(self, certificate: x509.Certificate) -> None:
        from shared.cluster import trust

        await trust.record_issued(self.client, certificate)


@dataclass(frozen=True)
class NodeTls:
    """PEM bytes of a node's TLS: the cluster CA, the node's key and certificate."""

    ca: bytes
    key: bytes
    cert: bytes
    # the files' modification times (ns) when read; () for PEM from elsewhere (a Join)
    stamp: tuple[int, ...] = ()

    @classmethod
    def of(cls, files: pki.ClusterFiles) -> NodeTls:
        """Blocking: reads the files."""
        # the times before the contents: a renewal that comes between is read next time
        stamp = _stamp(files)
        ca, key, cert = files.pems()  # says in a sentence what is missing or unreadable
        return cls(ca, key, cert, stamp)

    @classmethod
    def current(cls, files: pki.ClusterFiles, known: NodeTls | None) -> NodeTls:
        """Blocking: ``known`` while none of the files changed since it was read, else the
        files read again (the node's certificate renewed in place)."""
        if known is not None and known.stamp:
            now = _stamp(files)
            # one changed a moment ago may be half of a renewal: read it at the next call
            if now == known.stamp or not filestamp.settled(now):
                return known
        return cls.of(files)


def _stamp(files: pki.ClusterFiles) -> tuple[int, ...]:
    try:
        return files.stamp()
    except OSError:  # gone or unreadable: pems() says which
        return ()


def target(address: str, port: int) -> str:
    """``HOST:PORT`` for gRPC, an IPv6 address in brackets."""
    host = address.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"ipv6:[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def wildcard(address: str) -> str:
    """Every address of the node, of ``address``'s family (IPv6's takes IPv4 too)."""
    try:
        return "::" if ipaddress.ip_address(address.strip("[]")).version == 6 else "0.0.0.0"
    except ValueError:
        return "0.0.0.0"


def mesh_address(node: NodeRecord) -> str:
    """The node's address on the mesh: its block's gateway, which its WireGuard
    interface holds; "" for a node without a block."""
    try:
        block = ipaddress.ip_network(node.subnet)
    except ValueError:
        return ""
    return str(block.network_address + 1) if block.num_addresses > 2 else ""


def peer_address(node: NodeRecord, caller: NodeRecord | None) -> str:
    """Where ``caller`` (this node's record; None: unknown) dials ``node``'s peer port:
    its advertised address, or its mesh address when the others cannot reach it first
    (behind NAT) and both have the mesh on. Call it with ``expect_node=node.id``: the
    mesh address is not in the node's certificate."""
    if node.reachable or not node.wireguard_key:
        return node.address
    if caller is None or not caller.wireguard_key:
        return node.address  # no mesh here: the call fails, saying why
    return mesh_address(node) or node.address


def node_channel(
    node: NodeRecord,
    caller: NodeRecord | None,
    tls: NodeTls,
    options: list[tuple[str, Any]] | None = None,
    *,
    address: str | None = None,
) -> Any:
    """:func:`channel` to ``node``'s peer port from ``caller``, at :func:`peer_address`
    (``address``: the one the caller already worked out for the two), its certificate
    checked for the node's id."""
    if address is None:
        address = peer_address(node, caller)
    return channel(address, node.peer_port, tls, node.id, options)


def channel(
    address: str,
    port: int,
    tls: NodeTls,
    expect_node: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> Any:
    """A mutual-TLS channel to another node's peer port, trusting the cluster CA only.

    The server's certificate must name ``address``; with ``expect_node`` it
    must instead name that node id, so a call meant for one node never
    reaches another that took over its address.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    settings = list(options or [])
    if expect_node is not None:
        settings.append(("grpc.ssl_target_name_override", pki.check_node_id(expect_node)))
    return grpc.aio.secure_channel(target(address, port), credentials, options=settings)


def _caller(context: Any) -> str:
    """The caller's node id: the common name of its verified client certificate, or ''."""
    names = context.auth_context().get("x509_common_name") or []
    return bytes(names[0]).decode() if names else ""


def unary(
    request_type: type[Request],
    handle: Callable[[Request, str, Any], Awaitable[Wire]],
    *,
    needs_certificate: bool = True,
) -> Any:
    """A unary method handler: JSON bytes in and out; ``handle(request, caller, context)``.

    ``caller`` is the calling node's id; with ``needs_certificate`` a call
    without one (on the join port) is refused before ``handle`` runs.
    """

    async def method(raw: bytes, context: Any) -> bytes:
        caller = _caller(context)
        if needs_certificate and not caller:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs a node certificate of the cluster: call the node's peer port "
                "with the certificate the node got when it joined",
            )
        try:
            request = decode(raw, request_type)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is {exc}")
        reply = await handle(request, caller, context)
        return encode(reply).encode()

    return grpc.unary_unary_rpc_method_handler(method)


_STATUS_OF: dict[str, Any] = {
    "NotFoundError": grpc.StatusCode.NOT_FOUND,
    "InvalidArgumentError": grpc.StatusCode.INVALID_ARGUMENT,
    "InvalidSpecError": grpc.StatusCode.INVALID_ARGUMENT,
    "AlreadyExistsError": grpc.StatusCode.ALREADY_EXISTS,
    "ConflictError": grpc.StatusCode.FAILED_PRECONDITION,
    "NotSupportedError": grpc.StatusCode.UNIMPLEMENTED,
}
_ERROR_NAMED = {kind.__name__: kind for kind in ERRORS}


async def _abort_with(context: Any, exc: ZLayerError) -> None:
    """A ZLayer error to the caller: its sentence, its class in the trailing metadata."""
    name = type(exc).__name__
    sentence = str(exc.args[0]) if exc.args else name
    code = _STATUS_OF.get(name, grpc.StatusCode.ABORTED)
    await context.abort(code, sentence, trailing_metadata=((ERROR_KEY, name),))


async def _member_only(context: Any) -> str:
    caller = _caller(context)
    if not caller:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "this call needs a node certificate of the cluster: call the node's peer port "
            "with the certificate the node got when it joined",
        )
    return caller


def streaming(
    request_type: type[Request],
    handle: Callable[[Request, str, Any], AsyncIterator[Wire]],
) -> Any:
    """A server-streaming handler for nodes of the cluster only: one request, the replies
    ``handle(request, caller, context)`` yields; a ZLayer error it raises ends the call."""

    async def method(raw: bytes, context: Any) -> AsyncIterator[bytes]:
        caller = await _member_only(context)
        try:
            request = decode(raw, request_type)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is {exc}")
        try:
            async for reply in handle(request, caller, context):
                yield encode(reply).encode()
        except ZLayerError as exc:
            await _abort_with(context, exc)

    return grpc.unary_stream_rpc_method_handler(method)


def duplex(handle: Callable[[AsyncIterator[bytes], str, Any], AsyncIterator[Wire]]) -> Any:
    """A bidirectional handler for nodes of the cluster only: ``handle(requests, caller,
    context)`` reads the raw messages (:func:`decoded` reads one) and yields replies."""

    async def method(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        caller = await _member_only(context)
        try:
            async for reply in handle(requests, caller, context):
                yield encode(reply).encode()
        except ZLayerError as exc:
            await _abort_with(context, exc)

    return grpc.stream_stream_rpc_method_handler(method)


def decoded(raw: bytes, kind: type[Request]) -> Request:
    """One message of a stream; InvalidArgumentError (back to the caller) if it is not one."""
    from shared.bus import InvalidArgumentError

    try:
        return decode(raw, kind)
    except WireError as exc:
        raise InvalidArgumentError(f"the request is {exc}") from None


def zlayer_unary(
    request_type: type[Request], handle: Callable[[Request, str, Any], Awaitable[Wire]]
) -> Any:
    """:func:`unary` for nodes of the cluster only, a ZLayer error going back as itself."""

    async def guarded(request: Request, caller: str, context: Any) -> Wire:
        try:
            return await handle(request, caller, context)
        except ZLayerError as exc:
            await _abort_with(context, exc)
            raise

    return unary(request_type, guarded)


async def _pass(gate: Gate, context: Any) -> None:
    """Abort the call if the gate refuses its caller (one without a certificate is the
    handler's to refuse)."""
    caller = _caller(context)
    if caller:
        refusal = await gate(caller)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)


def _gated(handler: Any, gate: Gate) -> Any:
    """``handler`` with the gate asked first, whatever its kind of streaming."""
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def one(request: Any, context: Any) -> Any:
            await _pass(gate, context)
            return await unary_unary(request, context)

        return handler._replace(unary_unary=one)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def many(request: Any, context: Any) -> AsyncIterator[Any]:
            await _pass(gate, context)
            async for reply in unary_stream(request, context):
                yield reply

        return handler._replace(unary_stream=many)
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        async def both(requests: Any, context: Any) -> AsyncIterator[Any]:
            await _pass(gate, context)
            async for reply in stream_stream(requests, context):
                yield reply

        return handler._replace(stream_stream=both)
    stream_unary = handler.stream_unary

    async def gathered(requests: Any, context: Any) -> Any:
        await _pass(gate, context)
        return await stream_unary(requests, context)

    return handler._replace(stream_unary=gathered)


class PeerServer:
    """A node's ``zlayer.Node1`` server, on its peer port (mutual TLS) and join port."""

    def __init__(
        self,
        node_id: str,
        tls: NodeTls,
        *,
        authority: pki.Authority | None = None,
        desk: JoinDesk | None = None,
        methods: dict[str, Any] | None = None,
        secrets_key: bytes | None = None,
        agent: Any = None,
        gate: Gate | None = None,
    ) -> None:
        """``authority`` and ``desk`` make this node answer joins (the node that signs);
        ``methods`` adds handlers (from :func:`unary`) to the service by name;
        ``agent`` answers Logs, Exec and Stats of this node's replicas (none: agentd
        over the daemon's bus, at the first such call);
        ``secrets_key`` is the cluster's secrets key a joining node is handed (none:
        it gets none, and cannot open the cluster's secrets);
        ``gate`` is asked about each caller of every method but Join."""
        self.node_id = node_id
        self.tls = tls
        self.authority = authority
        self.desk = desk
        self._secrets_key = "" if secrets_key is None else secretkey.to_wire(secrets_key)
        self.peer_port = 0
        self.join_port = 0
        from shared.cluster.remote import ReplicaCalls  # it calls this module's clients

        handlers = {
            "Join": unary(JoinRequest, self._join, needs_certificate=False),
            "Ping": unary(PingRequest, self._ping),
            "Renew": unary(RenewRequest, self._renew),
            **ReplicaCalls(agent).methods(),
            **(methods or {}),
        }
        if gate is not None:
            handlers = {
                name: handler if name == "Join" else _gated(handler, gate)
                for name, handler in handlers.items()
            }
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )

    async def start(
        self,
        host: str,
        peer_port: int = 0,
        join_port: int | None = 0,
        *,
        peer_host: str | None = None,
    ) -> None:
        """Listen (port 0: a free one, then read ``peer_port``/``join_port``); no join
        port if ``join_port`` is None. The peer port on ``peer_host`` if given
        (:func:`wildcard`: calls through the mesh too), else on ``host``."""
        mutual = grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=True,
        )
        self.peer_port = self._listen(peer_host or host, peer_port, mutual)
        if join_port is not None:
            # the CA after the node's certificate: what a joining node checks its token against
            chain = self.tls.cert.rstrip(b"\n") + b"\n" + self.tls.ca
            server_only = grpc.ssl_server_credentials([(self.tls.key, chain)])
            self.join_port = self._listen(host, join_port, server_only)
        await self._server.start()

    def _listen(self, host: str, port: int, credentials: Any) -> int:
        address = target(host, port).removeprefix("ipv6:")
        bound = int(self._server.add_secure_port(address, credentials))
        if bound == 0:
            raise PeerError(
                f"cannot listen on {address} for calls between nodes; "
                "free the port or set another one"
            )
        return bound

    async def stop(self, grace: float | None = 1.0) -> None:
        await self._server.stop(grace)

    async def _ping(self, _request: PingRequest, caller: str, _context: Any) -> PingReply:
        return PingReply(node=self.node_id, peer=caller, time=time.time())

    async def _renew(self, request: RenewRequest, caller: str, context: Any) -> RenewReply:
        if self.authority is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self.node_id} does not sign certificates; ask another node",
            )
        assert self.authority is not None
        try:
            csr = pki.load_csr(request.csr.encode())
            if pki.node_id_of_request(csr) != caller:
                raise pki.PkiError(
                    f"node {caller} asked for a certificate of another node id; "
                    "a node renews only its own"
                )
            certificate = await asyncio.to_thread(self.authority.sign, csr)
        except pki.PkiError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(self.desk, Ledger):
            await self.desk.issued(certificate)
        return RenewReply(certificate=pki.certificate_pem(certificate).decode())

    async def _join(self, request: JoinRequest, _caller: str, context: Any) -> JoinReply:
        if self.authority is None or self.desk is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self.node_id} does not sign joins; "
                "make the token with zlayerctl node join-token on the node that does",
            )
        assert self.authority is not None and self.desk is not None
        try:
            record = await self.desk.token(jointoken.secret_sha256(request.secret))
            jointoken.check(request.secret, record)
        except JoinTokenError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        try:
            csr = pki.load_csr(request.csr.encode())
            node_id = pki.node_id_of_request(csr)
            # signed (the request checked) before it is admitted: admitted means it gets one
            certificate = await asyncio.to_thread(self.authority.sign, csr)
            endpoints = await self.desk.admit(node_id, request)
            if isinstance(self.desk, Ledger):
                await self.desk.issued(certificate)
        except pki.PkiError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except JoinRefusedError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return JoinReply(
            certificate=pki.certificate_pem(certificate).decode(),
            ca_certificate=pki.certificate_pem(self.authority.certificate).decode(),
            etcd_endpoints=endpoints,
            secrets_key=self._secrets_key,
            source_address=peer_host(context.peer() or ""),
        )


def peer_host(peer: str) -> str:
    """The host of gRPC's ``context.peer()`` ("ipv4:10.0.0.7:41234",
    "ipv6:[::1]:41234"), "" for another kind (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return unquote(rest.rpartition(":")[0]).strip("[]")
    return ""


async def call(
    channel: Any,
    method: str,
    request: Wire,
    reply_type: type[Reply],
    timeout: float = DEFAULT_TIMEOUT,
    where: str = "the other node",
) -> Reply:
    """One unary call on ``channel``; :class:`PeerError` with the server's sentence, or one
    saying why the node (``where``, for the message) could not be reached."""
    try:
        raw = await channel.unary_unary(method)(encode(request).encode(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise peer_error(exc, where) from None
    try:
        return decode(raw, reply_type)
    except WireError as exc:
        raise PeerError(
            f"{where} answered {method} with something else ({exc}); "
            "check that both nodes run the same ZLayer version"
        ) from None


class Peer:
    """Another node's peer port over mutual TLS: ``async with Peer(...) as node: await
    node.ping()``."""

    def __init__(
        self, address: str, port: int, tls: NodeTls, expect_node: str | None = None
    ) -> None:
        self.where = f"the node at {target(address, port).removeprefix('ipv6:')}"
        self.channel = channel(address, port, tls, expect_node)

    async def call(
        self, method: str, request: Wire, reply_type: type[Reply], timeout: float = DEFAULT_TIMEOUT
    ) -> Reply:
        return await call(self.channel, method, request, reply_type, timeout, self.where)

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> PingReply:
        return await self.call(PING, PingRequest(), PingReply, timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


async def renew(
    address: str,
    port: int,
    tls: NodeTls,
    csr: x509.CertificateSigningRequest,
    timeout: float = DEFAULT_TIMEOUT,
    expect_node: str | None = None,
) -> x509.Certificate:
    """A new certificate for this node's request, from the node at address:port (mutual
    TLS with the current certificate; its certificate must name ``expect_node`` if
    given, see :func:`peer_address`); PeerError if refused or not the CA's."""
    async with Peer(address, port, tls, expect_node) as node:
        reply = await node.call(
            RENEW, RenewRequest(csr=pki.csr_pem(csr).decode()), RenewReply, timeout
        )
    try:
        certificate = pki.load_certificate(reply.certificate.encode())
    except pki.PkiError as exc:
        raise PeerError(f"{node.where} answered the renewal with {exc}") from None
    ca = pki.load_certificate(tls.ca)
    if certificate.public_key() != csr.public_key() or not pki.issued_by(certificate, ca):
        raise PeerError(
            f"{node.where} answered the renewal with a certificate that is not this node's "
            "or not signed by the cluster CA"
        )
    return certificate


def peer_error(exc: Any, where: str) -> Exception:
    """A failed call as the ZLayer error the other node raised (its class and sentence), or
    a :class:`PeerError` saying why ``where`` did not answer."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KEY and value in _ERROR_NAMED:
            return _ERROR_NAMED[value]((exc.details() or "").strip())
    return _peer_error(exc, where)


def _peer_error(exc: Any, where: str) -> PeerError:
    code, details = exc.code(), (exc.details() or "").strip()
    if code in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
    ):
        return PeerError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerError(f"{where} did not answer in time; check that it is running")
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerError(
            f"cannot reach {where} over TLS ({_reason(details)}); "
            "check that it is running, that the address and port are right and that "
            "both nodes hold certificates of the same cluster"
        )
    return PeerError(f"{where} failed the call ({code.name}: {_reason(details)})")


# What gRPC's long status details mean, in a few words (checked in order).
_REASONS = (
    ("CERTIFICATE_VERIFY_FAILED", "a certificate is not one of this cluster's CA"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "this side showed no certificate"),
    ("Connection refused", "connection refused"),
    ("Tls handshake failed", "the TLS handshake failed"),
    ("Handshake", "the TLS handshake failed"),
    ("Deadline", "no answer in time"),
)


def _reason(details: str) -> str:
    for mark, reason in _REASONS:
        if mark in details:
            return reason
    line = details.splitlines()[0] if details else "no reason given"
    return line if len(line) <= 120 else line[:120].rsplit(" ", 1)[0] + " ..."


@dataclass(frozen=True)
class Joined:
    """What a node that joined keeps: its key and certificate, the CA, where etcd answers,
    and the cluster's secrets key (None: the node it joined through has none to give)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    etcd_endpoints: list[str]
    secrets_key: bytes | None = field(default=None, repr=False)
    source_address: str = ""  # where the answering node saw the join come from

    def write(self, files: pki.ClusterFiles) -> None:
        """Blocking: the CA certificate, the secrets key, then the node's key and
        certificate (last: a node with a certificate holds the rest)."""
        files.write_ca_certificate(self.ca_certificate)
        if self.secrets_key is not None:
            secretkey.write(files, self.secrets_key)
        files.write_node(self.key, self.certificate)

    def tls(self) -> NodeTls:
        return NodeTls(
            pki.certificate_pem(self.ca_certificate),
            pki.key_pem(self.key),
            pki.certificate_pem(self.certificate),
        )


def _shown_chain(address: str, port: int, timeout: float) -> list[bytes]:
    """Blocking: the certificates (DER) the server at address:port shows, unverified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing to trust yet: the fingerprint decides
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    host = address.strip("[]")
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        # public from Python 3.13 (SSLSocket.get_unverified_chain, DER bytes);
        # before, the same method of the C object, returning certificate objects
        if hasattr(tls, "get_unverified_chain"):
            return list(tls.get_unverified_chain())
        chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


async def pinned_ca(token: JoinToken, timeout: float = DEFAULT_TIMEOUT) -> x509.Certificate:
    """The CA certificate the node in the token shows, if its SHA-256 is the token's."""
    where = f"{token.address}:{token.port}"
    try:
        chain = await asyncio.to_thread(_shown_chain, token.address, token.port, timeout)
    except (OSError, ssl.SSLError) as exc:
        raise PeerError(
            f"cannot open TLS to the node at {where} "
            f"({getattr(exc, 'strerror', None) or exc}); check that the address in the token "
            "is reachable from this node and that the cluster's node is running"
        ) from None
    for der in chain:
        if hashlib.sha256(der).hexdigest() == token.ca_sha256:
            return x509.load_der_x509_certificate(der)
    raise PeerError(
        f"the node at {where} does not show the CA whose fingerprint is in the token: "
        "the token is for another cluster or something else answers at that address; "
        "check the address and make a new token on a node of the cluster"
    )


async def join(
    token: JoinToken,
    node_id: str,
    addresses: list[str],
    *,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> Joined:
    """Join the cluster of ``token`` as ``node_id`` reachable at ``addresses``."""
    where = f"{token.address}:{token.port}"
    ca = await pinned_ca(token, timeout)
    key = pki.make_key()
    csr = pki.make_csr(key, node_id, addresses)
    ca_pem = pki.certificate_pem(ca)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    request = JoinRequest(
        secret=token.secret, csr=pki.csr_pem(csr).decode(), name=name or socket.gethostname()
    )
    async with grpc.aio.secure_channel(target(token.address, token.port), credentials) as chan:
        try:
            raw = await chan.unary_unary(JOIN)(encode(request).encode(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "andshake" in (exc.details() or ""):
                raise PeerError(
                    f"the node at {where} shows the cluster's CA but no certificate of that CA "
                    f"for {token.address}: something else may answer at that address, or the "
                    "node's certificate does not name it; check the address and make a new "
                    "token on a node of the cluster"
                ) from None
            raise _peer_error(exc, f"the node at {where}") from None
    try:
        reply = decode(raw, JoinReply)
    except WireError as exc:
        raise PeerError(
            f"the node at {where} answered the join with something else ({exc})"
        ) from None
    try:
        certificate = pki.load_certificate(reply.certificate.encode())
        returned_ca = pki.load_certificate(reply.ca_certificate.encode())
    except pki.PkiError as exc:
        raise PeerError(f"the node at {where} answered the join with {exc}") from None
    try:
        secrets_key = secretkey.from_wire(reply.secrets_key)
    except secretkey.SecretsKeyError as exc:
        raise PeerError(str(exc)) from None
    if (
        pki.fingerprint(returned_ca) != token.ca_sha256
        or certificate.public_key() != key.public_key()
        or not pki.issued_by(certificate, ca)
    ):
        raise PeerError(
            f"the node at {where} answered the join with a certificate that is not this "
            "node's or not signed by the cluster CA; make a new token and join again"
        )
    return Joined(
        key,
        certificate,
        ca,
        list(reply.etcd_endpoints),
        secrets_key,
        source_address=reply.source_address,
    )
