"""Real registries for tests: Debian's docker-registry (Distribution) on free ports.

- :func:`start_registry` runs one with its own storage directory and config:
  anonymous, with htpasswd basic auth, or with token auth whose realm is a
  :class:`TokenServer` the test serves itself (an aiohttp app issuing RS256
  JWTs signed by a key whose self-signed certificate the registry trusts),
  over plain HTTP or over HTTPS with a certificate of :func:`tls_files`.
- :class:`FaultProxy` sits between registryd and a registry and can tamper
  with a blob, cut a blob's connection half way the first time, or serve
  blobs slowly; it records every request's Range header.
- :func:`skopeo_copy` puts images into a registry (and takes them out).

Everything is stopped by PID and removed when the fixture ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import BasicAuth, ClientSession, web

REGISTRY_BINARY = "docker-registry"
TOKEN_SERVICE = "zlayer-test-registry"
TOKEN_ISSUER = "zlayer-test-issuer"
USER, PASSWORD = "zlayer", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/apt-deps.sh test installs them)")


@dataclass
class Registry:
    """One running docker-registry."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (certificate, key) files.

    Whoever must trust it is given the certificate (``SSL_CERT_FILE``).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "registry.pem", directory / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def start_registry(
    auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None
) -> Registry:
    """A docker-registry; with ``tls`` (certificate, key) it speaks HTTPS only."""
    need_tools(REGISTRY_BINARY)
    root = Path(tempfile.mkdtemp(prefix="zlregistry-"))
    registry = Registry(root, free_port(), scheme="https" if tls else "http")
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": registry.host, "secret": uuid.uuid4().hex},
    }
    if auth:
        config["auth"] = auth
    if tls:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}  # type: ignore[index]
    (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    registry.process = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(root / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "registry.log", "wb"),  # noqa: SIM115 - the child owns it
    )
    deadline = time.monotonic() + 10
    unverified = ssl._create_unverified_context() if tls else None
    while True:
        try:
            urllib.request.urlopen(registry.url + "/v2/", timeout=1, context=unverified).close()
            break
        except urllib.error.HTTPError:
            break  # 401: up, and asking for credentials
        except OSError:
            if registry.process.poll() is not None or time.monotonic() > deadline:
                log = (root / "registry.log").read_text(errors="replace")
                registry.stop()
                raise RuntimeError(f"docker-registry did not start: {log}") from None
            time.sleep(0.05)
    return registry


def htpasswd_auth(directory: Path) -> dict[str, Any]:
    need_tools("htpasswd")
    path = directory / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(path), USER, PASSWORD], check=True, capture_output=True)
    return {"htpasswd": {"realm": "zlayer-test", "path": str(path)}}


def skopeo_copy(source: str, dest: str, *extra: str) -> None:
    need_tools("skopeo")
    result = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            *extra,
            source,
            dest,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- async servers in a thread


class _Loop:
    """An event loop in a thread, for the aiohttp servers below."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def serve(self, app: web.Application, host: str = "127.0.0.1") -> int:
        async def start() -> int:
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, host, 0)
            await site.start()
            server = site._server
            assert server is not None
            port: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            return port

        self.port = self.call(start())
        return self.port

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A token realm: checks basic credentials, issues JWTs the registry trusts.

    It listens on ``host``: another loopback address (127.0.0.2) stands for
    another host than the registry's. With ``anonymous``, a request without
    credentials gets a token granting nothing (as Docker Hub's realm does).
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", anonymous: bool = False) -> None:
        self.host = host
        self.anonymous = anonymous
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zlayer test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = directory / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        self.requests: list[dict[str, Any]] = []
        self.loop = _Loop()
        app = web.Application()
        app.router.add_get("/token", self._token)
        self.port = self.loop.serve(app, host)

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def _sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    async def _token(self, request: web.Request) -> web.Response:
        scopes = request.query.getall("scope", [])
        header = request.headers.get("Authorization", "")
        self.requests.append({"scopes": scopes, "authorized": bool(header)})
        if not header and not self.anonymous:
            return web.json_response({"errors": ["credentials needed"]}, status=401)
        if header:
            credentials = BasicAuth.decode(header)
            if (credentials.login, credentials.password) != (USER, PASSWORD):
                return web.json_response({"errors": ["wrong credentials"]}, status=401)
        access = []
        for scope in scopes if header else []:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": USER if header else "",
            "aud": request.query.get("service", ""),
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return web.json_response({"token": self._sign(claims), "expires_in": 300})

    def close(self) -> None:
        self.loop.close()


@dataclass
class FaultProxy:
    """A proxy in front of a registry that misbehaves on blob downloads as told."""

    upstream: str
    tamper: set[str] = field(default_factory=set)  # digests whose content is altered
    cut_once: set[str] = field(default_factory=set)  # digests cut half way, the first time
    slow: bool = False  # blobs trickle out (a pull that can be interrupted)
    dead: bool = False  # set by die(): every transfer breaks off, then the port closes
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (digest, Range header)
    loop: _Loop | None = None
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self.loop = _Loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.port = self.loop.serve(app)
        return self

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        body = await request.read()
        async with (
            ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as upstream,
        ):
            data = await upstream.read()
            out_headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            status = upstream.status
        digest = request.path.rsplit("/", 1)[-1]
        is_blob = "/blobs/sha256:" in request.path and request.method == "GET"
        if is_blob:
            self.ranges.append((digest, request.headers.get("Range", "")))
        if is_blob and digest in self.tamper and data:
            changed = bytearray(data)
            changed[len(changed) // 2] ^= 0xFF
            data = bytes(changed)
        if is_blob and (digest in self.cut_once or self.slow) and status in (200, 206):
            response = web.StreamResponse(status=status, headers=out_headers)
            response.content_length = len(data)
            await response.prepare(request)
            if digest in self.cut_once:
                self.cut_once.discard(digest)
                await response.write(data[: len(data) // 2])
                # A link that dies after the first half has arrived: the client
                # reads it first (a break in the same instant loses what the
                # HTTP client still buffered, and the resume starts earlier).
                await asyncio.sleep(0.3)
                assert request.transport is not None
                request.transport.close()
                return response
            for offset in range(0, len(data), 32 << 10):
                if self.dead:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(data[offset : offset + (32 << 10)])
                await asyncio.sleep(0.05)
            await response.write_eof()
            return response
        return web.Response(status=status, body=data, headers=out_headers)

    def die(self) -> None:
        """The registry goes away mid-transfer: connections break, the port closes."""
        self.dead = True
        self.close()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.close()


def put_manifest(
    registry: Registry, repository: str, reference: str, document: dict[str, Any]
) -> str:
    """PUT a manifest or index by hand (skopeo cannot push a nested index)."""
    body = json.dumps(document).encode()
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        data=body,
        method="PUT",
        headers={"Content-Type": document["mediaType"]},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["Docker-Content-Digest"])


def manifest_of(registry: Registry, repository: str, reference: str) -> tuple[bytes, str]:
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), str(response.headers["Docker-Content-Digest"])


def oci_manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def env_without_registry_auth() -> dict[str, str]:
    """zlayerctl's environment with no user auth file to pick up."""
    environ = dict(os.environ)
    for key in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        environ.pop(key, None)
    return environ
