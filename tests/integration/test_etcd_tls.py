"""etcd secured by the cluster CA: three real members, each with its own node certificate from
shared.cluster.pki for client and peer traffic; a node's certificate reaches them (aetcd and
etcdctl), a client without one or with another CA's is refused, and so is a stranger at a
member's peer port."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]
import pytest

from shared.cluster import pki
from shared.cluster.etcd import (
    ETCD_BINARY,
    Client,
    TLSFiles,
    client,
)
from tests.etcd_fixture import EtcdCluster, etcd_cluster

MEMBERS = ("m0", "m1", "m2")


def node_tls(directory: Path, authority: pki.Authority, node_id: str) -> TLSFiles:
    """A node's files as init or join writes them: the CA certificate, its key and certificate."""
    files = pki.ClusterFiles(directory / node_id)
    files.write_ca_certificate(authority.certificate)
    files.write_node(*authority.issue(node_id, ["127.0.0.1"]))
    return TLSFiles(ca=files.ca_cert, cert=files.node_cert, key=files.node_key)


@contextlib.contextmanager
def cluster_ca_etcd(root: Path, authority: pki.Authority) -> Iterator[EtcdCluster]:
    """Three members over HTTPS, client and peer certificates required, each its own node's."""
    tls = {name: node_tls(root / "pki", authority, name) for name in MEMBERS}
    schedd = node_tls(root / "pki", authority, "client-node")
    with etcd_cluster(len(MEMBERS), member_tls=tls.__getitem__, client_tls=schedd) as cluster:
        yield cluster


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="zletcdtls-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cluster_client(endpoints: list[str], tls: TLSFiles, timeout: float) -> Client:
    """A client of all the members: one gRPC target of several addresses is no one host
    name, so it checks the name every node certificate carries."""
    c = client(endpoints, tls, timeout)
    c._options["grpc.ssl_target_name_override"] = pki.ANY_NODE
    return c


def etcdctl(cluster: EtcdCluster, tls: TLSFiles, *args: str) -> str:
    """etcdctl (Go's TLS client) against the members; its output."""
    command = [
        "etcdctl",
        f"--endpoints={','.join(cluster.endpoints)}",
        f"--cacert={tls.ca}",
        f"--cert={tls.cert}",
        f"--key={tls.key}",
        "--dial-timeout=3s",
        "--command-timeout=5s",
    ]
    done = subprocess.run(
        [*command, *args],
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tls_answer(url: str, ca: Path, tls: TLSFiles | None, request: bytes) -> str:
    """What a member's port at ``url`` answers an HTTP ``request`` line over TLS (with
    ``tls``'s certificate, or none)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    context = ssl.create_default_context(cafile=str(ca))
    if tls is not None:
        context.load_cert_chain(tls.cert, tls.key)
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=parts.hostname) as stream,
    ):
        stream.sendall(request + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := stream.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(shutil.which(ETCD_BINARY) is None, reason="etcd-server is not installed")
def test_members_with_the_cluster_ca_answer_node_certificates_only(root: Path) -> None:
    authority = pki.Authority.make()
    with cluster_ca_etcd(root, authority) as cluster:
        # healthy at all: the three members reached each other over peer TLS, each with its
        # own node certificate, checked against the cluster CA
        node = cluster.tls
        assert node is not None

        async def as_a_node() -> None:
            async with cluster_client(cluster.endpoints, node, timeout=10) as c:
                await c.put(b"/zlayer/test/tls", b"over the cluster CA")
                got = await c.get(b"/zlayer/test/tls")
                assert got is not None and got.value == b"over the cluster CA"

        asyncio.run(as_a_node())
        assert "over the cluster CA" in etcdctl(cluster, node, "get", "/zlayer/test/tls")

        # a node of another cluster, even trusting this cluster's CA: refused by the members
        other = node_tls(root / "pki-other", pki.Authority.make(), "stranger")
        stranger = TLSFiles(ca=node.ca, cert=other.cert, key=other.key)

        async def as_a_stranger() -> None:
            async with cluster_client(cluster.endpoints, stranger, timeout=5) as c:
                await c.get(b"/zlayer/test/tls")

        with pytest.raises(aetcd.ClientError):
            asyncio.run(as_a_stranger())
        # no client certificate at all: the handshake itself is refused
        client_url = cluster.endpoints[0]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_answer(client_url, node.ca, None, b"GET /version HTTP/1.1")
        assert '"etcdserver":"3.' in tls_answer(client_url, node.ca, node, b"GET /version HTTP/1.1")

        # the peer port: a node certificate gets the member list, no certificate gets nothing
        peer_url = cluster.members[0].peer_urls[0]
        assert '"name":"m1"' in tls_answer(peer_url, node.ca, node, b"GET /members HTTP/1.1")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_answer(peer_url, node.ca, None, b"GET /members HTTP/1.1")


OLD_CERTIFICATE_LIFE = 6.0  # seconds: the certificate the client starts with


@pytest.mark.skipif(shutil.which(ETCD_BINARY) is None, reason="etcd-server is not installed")
def test_a_client_reconnects_with_the_certificate_renewed_under_it(root: Path) -> None:
    """schedd's etcd clients run for months, and a node's certificate is renewed in place
    long before it ends. A connection made after the old one expired (etcd restarted)
    must show the renewed certificate, or etcd refuses the node for good."""
    authority = pki.Authority.make()
    member = node_tls(root / "pki", authority, "m0")
    fixture = node_tls(root / "pki", authority, "fixture-node")
    # one member: with more, a client refused by one would move on to another, made anew
    with etcd_cluster(1, member_tls=lambda _name: member, client_tls=fixture) as cluster:
        files = pki.ClusterFiles(root / "pki" / "renewing-node")
        files.write_ca_certificate(authority.certificate)
        files.write_node(
            *authority.issue(
                "renewing-node",
                ["127.0.0.1"],
                valid_days=OLD_CERTIFICATE_LIFE / 86400,  # type: ignore[arg-type]
            )
        )
        tls = TLSFiles(ca=files.ca_cert, cert=files.node_cert, key=files.node_key)

        async def run() -> None:
            c = Client(cluster.endpoints, tls, timeout=5, follow=None, tls_look=0.5)
            c._options["grpc.ssl_target_name_override"] = pki.ANY_NODE
            async with c:
                await c.put(b"/zlayer/test/renewed", b"before")
                # renewed in place, as trust.renew_if_due writes it; then the old one ends
                files.write_node(*authority.issue("renewing-node", ["127.0.0.1"]))
                await asyncio.sleep(OLD_CERTIFICATE_LIFE + 1)
                # every connection to etcd drops; the next one shows a certificate again
                await asyncio.to_thread(cluster.restart, 0)
                deadline = asyncio.get_running_loop().time() + 20
                while True:
                    try:
                        await c.put(b"/zlayer/test/renewed", b"after")
                        break
                    except aetcd.ClientError:
                        if asyncio.get_running_loop().time() > deadline:
                            raise
                        await asyncio.sleep(0.5)
                got = await c.get(b"/zlayer/test/renewed")
                assert got is not None and got.value == b"after"

        asyncio.run(run())
