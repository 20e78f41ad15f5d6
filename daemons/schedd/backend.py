"""Which store keeps schedd's desired state: SQLite on a lone node, etcd in a cluster.

schedd's configuration can name an etcd with a ``[cluster]`` section (``node
init`` and ``node join`` write the node's etcd to ``cluster.toml`` instead, see
:mod:`shared.cluster.config`)::

    [cluster]
    etcd_endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    ca_file = "/etc/zlayer/cluster/ca.pem"      # the CA that signs etcd's certificates
    cert_file = "/etc/zlayer/cluster/node.pem"  # this node's client certificate
    key_file = "/etc/zlayer/cluster/node.key"

Neither (the default) is a lone node: the SQLite file. The etcd client is
imported only when a cluster is configured, so a lone schedd starts without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from daemons.schedd.store import DesiredStore, Store
from shared.config import DaemonSettings

if TYPE_CHECKING:
    from shared.cluster.etcd import TLSFiles


class ClusterSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """schedd's ``[cluster]`` section."""

    # the cluster's etcd client URLs; none: a lone node, its state in SQLite
    etcd_endpoints: list[str] = []
    # PEM files for mutual TLS with etcd: its CA, this node's certificate and key
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # seconds a store call waits for etcd before it fails with a sentence
    timeout: Annotated[float, Meta(gt=0, le=300)] = 10.0
    # In a cluster: the encrypted mesh between nodes (overlayd's WireGuard interface);
    # false keeps plain routes via the nodes' addresses
    mesh: bool = True
    mesh_port: Annotated[int, Meta(ge=1, le=65535)] = 51820  # its UDP listener
    mesh_keepalive: Annotated[int, Meta(ge=0, le=3600)] = 25  # seconds; 0: none
    # Behind NAT: the other nodes cannot reach this one first, so it joins as an etcd
    # client (never a voter they must reach) and they wait for its mesh handshake
    behind_nat: bool = False

    def __post_init__(self) -> None:
        files = (self.ca_file, self.cert_file, self.key_file)
        if any(files) and not all(files):
            # msgspec says where (`cluster`); the sentence names the keys
            raise ValueError("set ca_file, cert_file and key_file together")
        if any(files) and not self.etcd_endpoints:
            raise ValueError("TLS files are set but no etcd_endpoints")

    def tls(self) -> TLSFiles | None:
        if not self.ca_file:
            return None
        from shared.cluster.etcd import TLSFiles

        return TLSFiles(Path(self.ca_file), Path(self.cert_file), Path(self.key_file))


class SchedSettings(DaemonSettings, kw_only=True):
    # where the desired state lives: a [cluster] section with etcd endpoints puts it in etcd
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)


def open_store(cluster: ClusterSettings, sqlite_path: Path) -> DesiredStore:
    """The store ``cluster`` names: etcd when it has endpoints, else SQLite at ``sqlite_path``."""
    if not cluster.etcd_endpoints:
        return Store(sqlite_path)
    from daemons.schedd.etcdstore import EtcdStore

    return EtcdStore(cluster.etcd_endpoints, cluster.tls(), timeout=cluster.timeout)
