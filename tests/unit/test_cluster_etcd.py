"""shared.cluster.etcd without a running etcd: a member's command line, the client's target,
how the client reads its TLS files."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.cluster import etcd
from shared.cluster.etcd import EtcdMember, TLSFiles, _target


def member(**changes: object) -> EtcdMember:
    fields: dict[str, object] = {
        "name": "n1",
        "data_dir": Path("data"),
        "client_urls": ("https://10.0.0.1:2379",),
        "peer_urls": ("https://10.0.0.1:2380",),
        "initial_cluster": {"n1": "https://10.0.0.1:2380", "n2": "https://10.0.0.2:2380"},
    }
    fields.update(changes)
    return EtcdMember(**fields)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_a_members_command_line_names_its_cluster_and_urls() -> None:
    argv = member(initial_state="existing").argv()
    assert argv[0] == "etcd"
    assert flag(argv, "--name") == "n1" and flag(argv, "--data-dir") == "data"
    assert flag(argv, "--listen-client-urls") == "https://10.0.0.1:2379"
    assert flag(argv, "--advertise-client-urls") == "https://10.0.0.1:2379"
    assert flag(argv, "--initial-advertise-peer-urls") == "https://10.0.0.1:2380"
    assert flag(argv, "--initial-cluster") == "n1=https://10.0.0.1:2380,n2=https://10.0.0.2:2380"
    assert flag(argv, "--initial-cluster-state") == "existing"
    assert "--client-cert-auth" not in argv and "--peer-client-cert-auth" not in argv
    # Old history is compacted, or etcd fills its quota and refuses every write.
    assert flag(argv, "--auto-compaction-mode") == "periodic"
    assert flag(argv, "--auto-compaction-retention") == "1h"


def test_listening_on_every_address_advertises_the_reachable_one() -> None:
    argv = member(
        client_urls=("https://0.0.0.0:2379",),
        advertise_client_urls=("https://10.0.0.1:2379",),
    ).argv()
    assert flag(argv, "--listen-client-urls") == "https://0.0.0.0:2379"
    assert flag(argv, "--advertise-client-urls") == "https://10.0.0.1:2379"


def test_tls_files_turn_on_certificate_checks_for_clients_and_peers() -> None:
    client = TLSFiles(Path("ca.pem"), Path("c.pem"), Path("c.key"))
    peer = TLSFiles(Path("pca.pem"), Path("p.pem"), Path("p.key"))
    argv = member(client_tls=client, peer_tls=peer).argv()
    assert flag(argv, "--trusted-ca-file") == "ca.pem" and flag(argv, "--key-file") == "c.key"
    assert flag(argv, "--peer-trusted-ca-file") == "pca.pem"
    assert flag(argv, "--peer-cert-file") == "p.pem"
    assert "--client-cert-auth" in argv and "--peer-client-cert-auth" in argv


def test_the_environment_drops_etcd_settings_of_ours() -> None:
    env = member().env({"PATH": "/bin", "ETCD_NAME": "other", "ETCDCTL_API": "3"})
    assert env == {"PATH": "/bin"}


@pytest.mark.parametrize(
    ("endpoints", "target"),
    [
        (["http://127.0.0.1:2379"], "ipv4:127.0.0.1:2379"),
        (["https://10.0.0.1:2379", "10.0.0.2:2479"], "ipv4:10.0.0.1:2379,10.0.0.2:2479"),
        (["http://[::1]:2379", "http://[fd00::2]:2379"], "ipv6:[::1]:2379,[fd00::2]:2379"),
        (["https://etcd.example:2379"], "dns:etcd.example:2379"),
        (["http://10.0.0.1"], "ipv4:10.0.0.1:2379"),
    ],
)
def test_endpoints_become_one_grpc_target(endpoints: list[str], target: str) -> None:
    assert _target(endpoints) == target


def test_no_endpoint_is_a_sentence() -> None:
    with pytest.raises(ValueError, match="no etcd endpoint was given"):
        _target([])


def test_the_tls_files_are_read_once_in_a_thread_and_again_when_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = TLSFiles(tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key")
    for path in (files.ca, files.cert, files.key):
        path.write_bytes(f"{path.name} 1".encode())
    read: list[tuple[bytes, bytes, bytes]] = []  # what each credentials were made of
    on_the_loop: list[bool] = []
    loop_thread = threading.get_ident()
    real_credentials = etcd.grpc.ssl_channel_credentials

    def credentials(
        *, root_certificates: bytes, private_key: bytes, certificate_chain: bytes
    ) -> Any:
        read.append((root_certificates, certificate_chain, private_key))
        on_the_loop.append(threading.get_ident() == loop_thread)
        return real_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )

    monkeypatch.setattr(etcd.grpc, "ssl_channel_credentials", credentials)

    async def run() -> None:
        members = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
        client = etcd.Client(members, files, follow=None)
        await client.connect()
        try:
            client._channel(members[0])
            await client._before_channel()  # the member in use has its channel: no look
            client._current = 1
            await client._before_channel()  # a new member, the files unchanged
            client._channel(members[1])
            assert read == [(b"ca.pem 1", b"node.pem 1", b"node.key 1")]

            # The node's certificate and key renewed in place, settled since (the CA too).
            for path in (files.cert, files.key):
                path.write_bytes(f"{path.name} 2".encode())
            settled = time.time_ns() - 2_000_000_000
            for path in (files.ca, files.cert, files.key):
                os.utime(path, ns=(settled, settled))
            client._current = 2
            await client._before_channel()
            client._channel(members[2])
            assert read[1:] == [(b"ca.pem 1", b"node.pem 2", b"node.key 2")]
        finally:
            await client.close()

    asyncio.run(run())
    assert on_the_loop == [False, False]


def test_a_renewal_half_written_is_not_read_until_it_has_settled(tmp_path: Path) -> None:
    """A renewal writes the key, then the certificate: a look between the two would pair
    the new key with the old certificate, so files changed a moment ago wait."""
    files = TLSFiles(tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key")
    long_ago = time.time_ns() - 60_000_000_000
    for path in (files.ca, files.cert, files.key):
        path.write_bytes(f"{path.name} 1".encode())
        os.utime(path, ns=(long_ago, long_ago))
    known = etcd._read_tls(files, None)

    files.key.write_bytes(b"node.key 2")  # the new key, a moment ago; the old certificate
    assert etcd._read_tls(files, known) is known

    files.cert.write_bytes(b"node.pem 2")
    settled = time.time_ns() - 2_000_000_000
    for path in (files.key, files.cert):
        os.utime(path, ns=(settled, settled))
    renewed = etcd._read_tls(files, known)
    assert renewed is not known and renewed.stamp != known.stamp
