"""``zlayerctl node``: this node in a cluster: init, join-token, join, ls, label, drain,
undrain, rm, rotate-key.

Each asks this node's schedd (Scheduler1's node methods, root only); schedd
does the work (the cluster CA, cluster.toml, its etcd member, the move of its
state into etcd), so these run on the node itself, never through ``--host``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from ctl.client import Client, LocalClient
from ctl.output import err_console, fail, format_option, print_json, print_rows

if TYPE_CHECKING:
    from shared.clients import SchedulerClient
    from shared.wire.cluster import NodeList, NodeRecord
    from shared.wire.mesh import MeshPeer, MeshStatus

T = TypeVar("T")

_TTL = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)?")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _with_client(do: Callable[[LocalClient], Awaitable[T]]) -> T:
    """``do(client)`` with this node's bus client (schedd and overlayd)."""

    async def run() -> T:
        client = Client()
        try:
            if not isinstance(client, LocalClient):
                fail("node commands act on the node they run on: run them there, without --host")
            return await do(client)
        finally:
            client.close()

    return asyncio.run(run())


def _call(do: Callable[[SchedulerClient], Awaitable[T]]) -> T:
    """``do(scheduler)`` with schedd's typed client on this node's bus."""
    return _with_client(lambda client: do(client.scheduler))


def parse_ttl(text: str) -> float:
    found = _TTL.fullmatch(text.strip())
    if not found or float(found["n"]) <= 0:
        fail(f"{text!r} is not a lifetime; write it as 30m, 1h, 2d or seconds")
    return float(found["n"]) * _SECONDS[found["unit"] or "s"]


def parse_labels(items: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``k=v`` sets a label, ``k-`` removes one."""
    labels: dict[str, str] = {}
    remove: list[str] = []
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            if key:
                labels[key] = value
                continue
        elif item.endswith("-") and len(item) > 1:
            remove.append(item[:-1])
            continue
        fail(f"{item!r} is not a label change; write KEY=VALUE to set one, KEY- to remove one")
    return labels, remove


def _gib(memory: int) -> str:
    return f"{memory / 2**30:.1f} GiB"


def _said(record: NodeRecord, what: str) -> None:
    err_console.print(f"node {record.id} ({record.name}, {record.address}) {what}", highlight=False)


def _size(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _ago(when: float, now: float) -> str:
    if not when:
        return "never"
    seconds = max(0, int(now - when))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def mesh_peer_of(record: NodeRecord, mesh: MeshStatus | None) -> MeshPeer | None:
    """This node's WireGuard peer for ``record`` (by its key), if any."""
    if mesh is None or not record.wireguard_key:
        return None
    return next((p for p in mesh.peers if p.public_key == record.wireguard_key), None)


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0].strip("[]")


def unreachable_reason(
    record: NodeRecord, this_node: str, mesh: MeshStatus | None, joined_since: float
) -> str:
    """Why the other nodes cannot reach ``record``'s node directly, as seen from this
    node, in one sentence; "" when nothing says so. ``joined_since``: seconds the node
    has been up, so a node just started is not reported before its first handshake."""
    if record.id == this_node:
        return record.reachability
    if not record.reachable:
        return record.reachability or "it says the other nodes cannot reach it first"
    peer = mesh_peer_of(record, mesh)
    if peer is None:
        return ""
    if peer.last_handshake and peer.endpoint and _host(peer.endpoint) != record.address:
        return (
            f"its mesh packets come from {_host(peer.endpoint)}, not its advertised address "
            f"{record.address}: it is behind NAT; set [cluster] behind_nat = true in its "
            "schedd settings so the others wait for it"
        )
    if not peer.last_handshake and peer.endpoint and joined_since > 30:
        return (
            f"no mesh handshake with it from this node; check that UDP port "
            f"{record.mesh_port} on {record.address} is open to this node"
        )
    return ""


async def _mesh_of(client: LocalClient) -> MeshStatus | None:
    """This node's mesh as overlayd reports it; None when overlayd cannot say."""
    try:
        return await client.overlay.get_mesh()
    except Exception:  # overlayd down, or one without the mesh: nothing to fill in
        return None


@click.group()
def node() -> None:
    """The cluster: init, join-token, join, ls, label, drain, undrain, rm, rotate-key."""


@node.command("init")
@click.option("--advertise", default="", metavar="ADDR", help="the address other nodes reach")
@click.option(
    "--cluster-subnet",
    default="",
    metavar="CIDR",
    help="the replicas' range, one /24 of it a node (default: this node's overlayd subnet)",
)
@click.option(
    "--etcd-voters",
    type=click.Choice(["1", "3", "5", "7"]),
    default="3",
    show_default=True,
    help="nodes that are etcd voters; later ones are its clients",
)
def init(advertise: str, cluster_subnet: str, etcd_voters: str) -> None:
    """Make this node a one-node cluster (its state moves into etcd)."""
    from shared.cluster.blocks import init_argument

    voters = int(etcd_voters)
    argument = init_argument(advertise, cluster_subnet, 0 if voters == 3 else voters)
    record = _call(lambda scheduler: scheduler.node_init(argument))
    _said(record, "is a one-node cluster; add nodes with `zlayerctl node join-token`")


@node.command("join-token")
@click.option("--ttl", default="24h", metavar="TTL", help="how long it may be used (30m, 1h, 2d)")
def join_token(ttl: str) -> None:
    """Print a token another node joins this cluster with."""
    seconds = parse_ttl(ttl)
    click.echo(_call(lambda scheduler: scheduler.node_join_token(seconds)))


@node.command("join")
@click.argument("token")
@click.option("--advertise", default="", metavar="ADDR", help="the address other nodes reach")
def join(token: str, advertise: str) -> None:
    """Join the cluster of TOKEN (from `zlayerctl node join-token`)."""
    record = _call(lambda scheduler: scheduler.node_join(token, advertise))
    role = "an etcd voter" if record.etcd_member else "a client of etcd"
    block = f"; its replicas' block is {record.subnet}" if record.subnet else ""
    _said(record, f"joined the cluster as {role}{block}")


@node.command("ls")
@format_option
def ls(output_format: str) -> None:
    """List the cluster's nodes: state, role, labels, resources, mesh handshakes."""
    from shared.wire import to_builtins

    async def read(client: LocalClient) -> tuple[NodeList, MeshStatus | None]:
        return await client.scheduler.list_nodes(), await _mesh_of(client)

    found, mesh = _with_client(read)
    now = time.time()
    reasons = {
        r.id: unreachable_reason(r, found.this_node, mesh, now - r.started_at) for r in found.nodes
    }
    if output_format == "json":
        data = to_builtins(found)
        for record, item in zip(found.nodes, data["nodes"], strict=True):
            peer = mesh_peer_of(record, mesh)
            item["mesh_peer"] = to_builtins(peer) if peer is not None else None
            item["unreachable"] = reasons[record.id]
        data["mesh"] = to_builtins(mesh) if mesh is not None else None
        print_json(data)
        return
    print_rows(
        output_format,
        found.nodes,
        [
            "ID",
            "NAME",
            "ADDRESS",
            "STATE",
            "ROLE",
            "ETCD",
            "LABELS",
            "CPU",
            "MEMORY",
            "HANDSHAKE",
            "TRANSFER",
        ],
        lambda r: [
            r.id + (" *" if r.id == found.this_node else ""),
            r.name,
            r.address,
            r.state,
            "leader" if r.id == found.leader else "member",
            "voter" if r.etcd_member else "client",
            ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-",
            f"{r.capacity.cpu:g}",
            _gib(r.capacity.memory),
            *_mesh_cells(r, found, mesh, now),
        ],
    )
    for record in found.nodes:
        if reasons[record.id]:
            click.echo(
                f"{record.name} ({record.id}) is not reachable directly: {reasons[record.id]}"
            )


def _mesh_cells(
    record: NodeRecord, found: NodeList, mesh: MeshStatus | None, now: float
) -> list[str]:
    """HANDSHAKE and TRANSFER of this node's mesh peer for ``record``."""
    if record.id == found.this_node:
        on = mesh is not None and mesh.enabled
        return ["(this node)" if on else "mesh off", "-"]
    peer = mesh_peer_of(record, mesh)
    if peer is None:
        return ["plain" if not record.wireguard_key else "no peer", "-"]
    return [
        _ago(peer.last_handshake, now),
        f"{_size(peer.rx_bytes)} in, {_size(peer.tx_bytes)} out",
    ]


@node.command("label")
@click.argument("node_id", metavar="ID")
@click.argument("changes", nargs=-1, required=True, metavar="KEY=VALUE|KEY-...")
def label(node_id: str, changes: tuple[str, ...]) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of node ID."""
    labels, remove = parse_labels(changes)
    _call(lambda scheduler: scheduler.label_node(node_id, labels, remove))
    err_console.print(f"node {node_id} labelled", highlight=False)


@node.command("drain")
@click.argument("node_id", metavar="ID")
def drain(node_id: str) -> None:
    """Mark node ID draining: its replicas move to other nodes."""
    _call(lambda scheduler: scheduler.drain_node(node_id))
    err_console.print(f"node {node_id} is draining", highlight=False)


@node.command("rotate-key")
def rotate_key() -> None:
    """Give this node's mesh a new key pair; the other nodes take it from its record."""
    record = _call(lambda scheduler: scheduler.rotate_mesh_key())
    err_console.print(
        f"node {record.id} has a new mesh key {record.wireguard_key}; the other nodes take "
        "it from its record",
        highlight=False,
    )


@node.command("undrain")
@click.argument("node_id", metavar="ID")
def undrain(node_id: str) -> None:
    """Put drained node ID back in service: new replicas may be placed on it again."""
    _call(lambda scheduler: scheduler.undrain_node(node_id))
    err_console.print(f"node {node_id} is ready", highlight=False)


@node.command("rm")
@click.argument("node_id", metavar="ID")
def rm(node_id: str) -> None:
    """Remove node ID from the cluster (its record and its etcd member)."""
    _call(lambda scheduler: scheduler.remove_node(node_id))
    err_console.print(f"node {node_id} removed from the cluster", highlight=False)
