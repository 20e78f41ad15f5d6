"""WireGuard's cross-platform userspace API: the text protocol on the device's unix socket.

A request is ``get=1`` or ``set=1`` followed by ``key=value`` lines and an
empty line; the answer is ``key=value`` lines ending with ``errno=N`` and an
empty line. Keys travel in hex. In a ``set``, device keys come first, then
each peer starts with its ``public_key`` and the lines after it apply to it
(``remove``, ``endpoint``, ``persistent_keepalive_interval``,
``replace_allowed_ips``, ``allowed_ip``). ``wireguard-go`` serves it on
``/var/run/wireguard/<iface>.sock``.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from shared.mesh import keys
from shared.mesh.device import Changes, DeviceState, MeshError, PeerState

SOCKET_DIR = Path("/var/run/wireguard")
TIMEOUT = 5.0
MAX_ANSWER = 4 << 20  # bytes; a device with thousands of peers stays far below


def socket_path(interface: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{interface}.sock"


def format_set(changes: Changes) -> str:
    """The ``set=1`` request for ``changes`` (without touching peers it does not name)."""
    lines = ["set=1"]
    if changes.private_key is not None:
        lines.append(f"private_key={keys.to_hex(changes.private_key)}")
    if changes.listen_port is not None:
        lines.append(f"listen_port={changes.listen_port}")
    for key in changes.remove:
        lines += [f"public_key={keys.to_hex(key)}", "remove=true"]
    for peer in changes.upsert:
        lines.append(f"public_key={keys.to_hex(peer.public_key)}")
        if peer.public_key in changes.with_endpoint and peer.endpoint:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={cidr}" for cidr in peer.allowed_ips]
    return "\n".join(lines) + "\n\n"


def parse_errno(text: str) -> int:
    """The ``errno`` an answer ends with; MeshError if it has none."""
    for line in reversed(text.splitlines()):
        if line.startswith("errno="):
            try:
                return int(line[len("errno=") :])
            except ValueError:
                break
    raise MeshError("the WireGuard device answered without an errno line")


def parse_get(text: str) -> DeviceState:
    """A ``get=1`` answer as a DeviceState; MeshError if it is malformed or an error."""
    code = parse_errno(text)
    if code != 0:
        raise MeshError(f"the WireGuard device refused get: {os.strerror(code)}")
    private_key = ""
    listen_port = 0
    peers: list[PeerState] = []
    peer: dict[str, object] | None = None
    allowed: list[str] = []

    def finish() -> None:
        if peer is not None:
            sec = int(str(peer.get("last_handshake_time_sec", 0)))
            nsec = int(str(peer.get("last_handshake_time_nsec", 0)))
            peers.append(
                PeerState(
                    public_key=str(peer["public_key"]),
                    endpoint=str(peer.get("endpoint", "")),
                    allowed_ips=tuple(allowed),
                    keepalive=int(str(peer.get("persistent_keepalive_interval", 0))),
                    last_handshake=sec + nsec / 1e9 if sec or nsec else 0.0,
                    rx_bytes=int(str(peer.get("rx_bytes", 0))),
                    tx_bytes=int(str(peer.get("tx_bytes", 0))),
                )
            )

    try:
        for line in text.splitlines():
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise MeshError(f"the WireGuard device answered a line without '=': {line[:80]!r}")
            if key == "errno":
                continue
            if key == "public_key":
                finish()
                peer = {"public_key": keys.from_hex(value)}
                allowed = []
            elif peer is None:
                if key == "private_key":
                    private_key = keys.from_hex(value)
                elif key == "listen_port":
                    listen_port = int(value)
            elif key == "allowed_ip":
                allowed.append(value)
            else:
                peer[key] = value
        finish()
    except (ValueError, keys.InvalidKeyError) as exc:
        if isinstance(exc, MeshError):
            raise
        raise MeshError(f"the WireGuard device answered something unreadable: {exc}") from None
    return DeviceState(private_key=private_key, listen_port=listen_port, peers=tuple(peers))


class UapiClient:
    """Blocking requests on one device's socket (one connection per request)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exchange(self, request: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(str(self.path))
                sock.sendall(request.encode())
                chunks: list[bytes] = []
                size = 0
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        raise MeshError("the WireGuard device's answer is too long")
                    # An answer ends with an empty line after errno.
                    if b"\n\n" in chunk or b"".join(chunks[-2:]).endswith(b"\n\n"):
                        break
            except OSError as exc:
                raise MeshError(
                    f"cannot talk to the WireGuard device on {self.path}: {exc.strerror or exc}"
                ) from None
        return b"".join(chunks).decode(errors="replace")

    def get(self) -> DeviceState:
        return parse_get(self.exchange("get=1\n\n"))

    def set(self, changes: Changes) -> None:
        code = parse_errno(self.exchange(format_set(changes)))
        if code != 0:
            name = errno.errorcode.get(code, str(code))
            raise MeshError(
                f"the WireGuard device refused the configuration ({name}: {os.strerror(code)})"
            )

    def answers(self) -> bool:
        """True if a device serves the socket."""
        try:
            self.get()
        except MeshError:
            return False
        return True
