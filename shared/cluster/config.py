"""A node's cluster configuration: ``<config_dir>/cluster.toml``.

Absent, the node is lone (schedd keeps its state in SQLite). ``zlayerctl node
init`` and ``node join`` write it; schedd, the supervisor (``zlayerctl daemon
run``), ``python -m shared.cluster.etcd run`` and overlayd (its ``block`` is the
replicas' subnet, see :func:`block_of`) read it::

    node_id = "web1-3f9a2c"
    name = "web1"
    advertise = "10.0.0.11"
    etcd_endpoints = ["https://10.0.0.11:2379"]
    files = "/var/lib/zlayer/cluster"       # ClusterFiles: ca.crt, node.crt, node.key
    peer_port = 9480
    join_port = 9481
    block = "10.213.1.0/24"                 # its block of the cluster's replica range

    [labels]
    zone = "a"

    [etcd]                                  # only where this node runs an etcd member
    name = "web1-3f9a2c"
    data_dir = "/var/lib/zlayer/etcd"
    client_urls = ["https://10.0.0.11:2379", "https://127.0.0.1:2379"]
    advertise_client_urls = ["https://10.0.0.11:2379"]
    peer_urls = ["https://10.0.0.11:2380"]
    initial_state = "new"
    cluster_token = "zlayer-8d1e"
    [etcd.initial_cluster]
    web1-3f9a2c = "https://10.0.0.11:2380"

The file is written whole (:func:`save`); TOML is written here by hand, as
the fields are few and plain (tomllib only reads).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import Meta

from shared.paths import Paths
from shared.statefile import write_atomically

if TYPE_CHECKING:
    from shared.cluster.etcd import EtcdMember

FILE_NAME = "cluster.toml"
PEER_PORT = 9480
JOIN_PORT = 9481
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380

Port = Annotated[int, Meta(ge=1, le=65535)]


class ClusterConfigError(ValueError):
    """A cluster.toml that cannot be used, in one sentence."""


class EtcdMemberConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The etcd member this node runs."""

    name: str
    data_dir: str
    client_urls: list[str]
    advertise_client_urls: list[str] = []
    peer_urls: list[str]
    initial_cluster: dict[str, str]
    initial_state: Literal["new", "existing"] = "new"
    cluster_token: str = "zlayer"


class ClusterConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """This node in its cluster."""

    node_id: str
    name: str = ""
    advertise: str
    etcd_endpoints: list[str]
    files: str  # the ClusterFiles directory
    peer_port: Port = PEER_PORT
    join_port: Port = JOIN_PORT
    labels: dict[str, str] = {}
    # this node's block of the cluster's replica range (shared.cluster.blocks), which
    # overlayd takes for its subnet; "" in a cluster made before blocks were handed out
    block: str = ""
    etcd: EtcdMemberConfig | None = None


def path_of(paths: Paths) -> Path:
    return paths.config_dir / FILE_NAME


def load(paths: Paths) -> ClusterConfig | None:
    """The node's cluster configuration; None on a lone node (no file)."""
    path = path_of(paths)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise ClusterConfigError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    except OSError as exc:
        raise ClusterConfigError(f"cannot read {path}: {exc.strerror}; run as root") from None
    try:
        return msgspec.convert(values, ClusterConfig)
    except msgspec.ValidationError as exc:
        raise ClusterConfigError(f"{path} is not a cluster configuration ({exc}); fix it") from None


def why_no_cluster(paths: Paths) -> Exception:
    """Why a node command finds no cluster here (blocking: it reads cluster.toml), as the
    bus error to raise: a member whose schedd is still reaching its cluster (the file
    names one), or a node in none."""
    from shared.bus import InvalidArgumentError, UnavailableError

    try:
        member = load(paths) is not None
    except ClusterConfigError:
        member = False
    if member:
        return UnavailableError(
            "schedd is still reaching this node's cluster (it waits for etcd); try again shortly"
        )
    return InvalidArgumentError(
        "this node is not in a cluster; zlayerctl node init makes one, node join joins one"
    )


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to cluster.toml")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _table(values: dict[str, object], name: str) -> list[str]:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, object]]] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, table in tables:
        full = f"{name}.{_key(key)}" if name else _key(key)
        lines += ["", f"[{full}]", *_table(table, full)]
    return lines


def dumps(config: ClusterConfig) -> str:
    return "\n".join(_table(msgspec.to_builtins(config), "")) + "\n"


def save(paths: Paths, config: ClusterConfig) -> None:
    """Write the configuration whole (0600: it names this node's key)."""
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path_of(paths), dumps(config).encode(), 0o600)


def remove(paths: Paths) -> None:
    path_of(paths).unlink(missing_ok=True)


def block_of(paths: Paths) -> str | None:
    """This node's block of the cluster's replica range; None on a lone node or a
    cluster made before blocks were handed out."""
    found = load(paths)
    return found.block if found is not None and found.block else None


def member(config: ClusterConfig) -> EtcdMember | None:
    """The etcd member this node runs, TLS from its cluster files; None if it runs none."""
    from shared.cluster.etcd import EtcdMember, TLSFiles

    wanted = config.etcd
    if wanted is None:
        return None
    files = Path(config.files)
    tls = TLSFiles(ca=files / "ca.crt", cert=files / "node.crt", key=files / "node.key")
    # The CA's revocation list (removed nodes), read by etcd at every new TLS
    # connection. Named only once it exists: etcd refuses every connection when
    # the file it is given cannot be read.
    crl = files / "crl.pem"
    extra = ("--client-crl-file", str(crl), "--peer-crl-file", str(crl)) if crl.exists() else ()
    return EtcdMember(
        name=wanted.name,
        data_dir=Path(wanted.data_dir),
        client_urls=tuple(wanted.client_urls),
        advertise_client_urls=tuple(wanted.advertise_client_urls),
        peer_urls=tuple(wanted.peer_urls),
        initial_cluster=dict(wanted.initial_cluster),
        initial_state=wanted.initial_state,
        cluster_token=wanted.cluster_token,
        client_tls=tls,
        peer_tls=tls,
        extra_args=extra,
    )
