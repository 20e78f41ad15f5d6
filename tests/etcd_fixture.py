"""Real etcd for tests: 1 or 3 members on 127.0.0.1, on free ports, in a directory of the test's.

:func:`etcd_cluster` starts the members (``/usr/bin/etcd``), waits until every
one answers a linearizable read, and yields an :class:`EtcdCluster` (client
endpoints, the members, ``kill``/``restart`` of one member). At the end, even
on failure, every member it started is killed by PID and its data removed.

The fixtures ``etcd1`` and ``etcd3`` wrap it for pytest::

    from tests.etcd_fixture import etcd1  # noqa: F401  (a fixture)
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctl.supervisor import _die_with_parent
from shared.cluster.etcd import ETCD_BINARY, EtcdMember, TLSFiles, wait_healthy
from tests.registry_fixture import free_port, tls_files

HEALTHY_WITHIN = 30.0  # seconds; three members are healthy in about 2.5 s here
STARTS = 3  # tries, each on new ports: another test may take a free port first


@dataclass
class EtcdCluster:
    """Members this test started, and their processes."""

    root: Path
    members: list[EtcdMember]
    tls: TLSFiles | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [m.client_urls[0] for m in self.members]

    def member(self, index: int) -> EtcdMember:
        return self.members[index]

    def log(self, member: EtcdMember) -> Path:
        return self.root / f"{member.name}.log"

    def start(self, member: EtcdMember) -> None:
        with self.log(member).open("ab") as log:
            self.processes[member.name] = subprocess.Popen(
                member.argv(),
                env=member.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a ^C to the tests does not reach it first
                # A test process killed outright (a hard timeout) takes its members along.
                preexec_fn=_die_with_parent,
            )

    def kill(self, index: int) -> None:
        """SIGKILL one member (by the PID we started); its data stays."""
        process = self.processes.pop(self.members[index].name, None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=30)

    def restart(self, index: int) -> None:
        """Start a killed member again on its data (it rejoins the cluster)."""
        member = self.members[index]
        self.kill(index)
        self.start(member)
        asyncio.run(wait_healthy(member.client_urls, HEALTHY_WITHIN, self.tls))

    def stop(self) -> None:
        for index in range(len(self.members)):
            self.kill(index)

    def logs(self) -> str:
        """The last lines of every member's log, for a failure message."""
        out = []
        for member in self.members:
            path = self.log(member)
            lines = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else []
            out.append(f"--- {member.name}\n" + "\n".join(lines))
        return "\n".join(out)


def _members(root: Path, count: int, tls: Callable[[str], TLSFiles] | None) -> list[EtcdMember]:
    scheme = "https" if tls else "http"
    ports = [(free_port(), free_port()) for _ in range(count)]
    names = [f"m{i}" for i in range(count)]
    initial = {
        name: f"{scheme}://127.0.0.1:{peer}" for name, (_, peer) in zip(names, ports, strict=True)
    }
    return [
        EtcdMember(
            name=name,
            data_dir=root / name,
            client_urls=(f"{scheme}://127.0.0.1:{client}",),
            peer_urls=(f"{scheme}://127.0.0.1:{peer}",),
            initial_cluster=initial,
            cluster_token=f"zlayer-test-{root.name}",
            client_tls=tls(name) if tls else None,
            peer_tls=tls(name) if tls else None,
        )
        for name, (client, peer) in zip(names, ports, strict=True)
    ]


@contextlib.contextmanager
def etcd_cluster(
    members: int = 1,
    *,
    tls: bool = False,
    member_tls: Callable[[str], TLSFiles] | None = None,
    client_tls: TLSFiles | None = None,
) -> Iterator[EtcdCluster]:
    """``members`` real etcd members, healthy; killed and removed at the end.

    With ``tls`` they speak HTTPS with client certificates (client and peer),
    from one self-signed CA for 127.0.0.1 that is also the certificate of all.
    With ``member_tls`` (member name ``m0``, ``m1``... -> its files) each member
    has its own, and ``client_tls`` is what the fixture (and ``cluster.tls``)
    reaches them with.
    """
    if shutil.which(ETCD_BINARY) is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    # Short and of our own; never under a path another test removes.
    root = Path(tempfile.mkdtemp(prefix="zletcd-"))
    files = client_tls
    if tls and member_tls is None:
        cert, key = tls_files(root)
        files = shared = TLSFiles(ca=cert, cert=cert, key=key)

        def member_tls(_name: str) -> TLSFiles:
            return shared  # one set of files for all

    cluster = EtcdCluster(root, [], files)
    try:
        for attempt in range(STARTS):
            for member in cluster.members:
                shutil.rmtree(member.data_dir, ignore_errors=True)
            cluster.members = _members(root, members, member_tls)
            for member in cluster.members:
                cluster.start(member)
            try:
                asyncio.run(wait_healthy(cluster.endpoints, HEALTHY_WITHIN, files))
                break
            except TimeoutError:
                logs = cluster.logs()
                cluster.stop()
                if "address already in use" in logs and attempt + 1 < STARTS:
                    continue
                raise AssertionError(f"etcd did not become healthy:\n{logs}") from None
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def etcd1() -> Iterator[EtcdCluster]:
    """One healthy etcd member."""
    with etcd_cluster(1) as cluster:
        yield cluster


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    """Three healthy etcd members, one cluster."""
    with etcd_cluster(3) as cluster:
        yield cluster
