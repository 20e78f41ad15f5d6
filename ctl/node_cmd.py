"""``zlayerctl node``: this node in a cluster: init, join-token, join, ls, label, drain, rm.

Each asks this node's schedd (Scheduler1's node methods, root only); schedd
does the work (the cluster CA, cluster.toml, its etcd member, the move of its
state into etcd), so these run on the node itself, never through ``--host``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ctl.client import Client
from ctl.output import err_console, fail, format_option, print_json, print_rows

if TYPE_CHECKING:
    from shared.wire.cluster import NodeRecord

T = TypeVar("T")

_TTL = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)?")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _call(do: Callable[[Any], Awaitable[T]]) -> T:
    """``do(proxy)`` with schedd's Scheduler1 proxy on this node's bus."""

    async def run() -> T:
        client = Client()
        try:
            if client.remote:
                fail("node commands act on the node they run on: run them there, without --host")
            return await do(client.scheduler.proxy)  # type: ignore[attr-defined]
        finally:
            client.close()

    return asyncio.run(run())


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


@click.group()
def node() -> None:
    """This node in a cluster: init, join-token, join, ls, label, drain, rm."""


@node.command("init")
@click.option("--advertise", default="", metavar="ADDR", help="the address other nodes reach")
def init(advertise: str) -> None:
    """Make this node a one-node cluster (its state moves into etcd)."""
    from shared.wire import decode
    from shared.wire.cluster import NodeRecord

    record = decode(_call(lambda p: p.node_init(advertise)), NodeRecord)
    _said(record, "is a one-node cluster; add nodes with `zlayerctl node join-token`")


@node.command("join-token")
@click.option("--ttl", default="24h", metavar="TTL", help="how long it may be used (30m, 1h, 2d)")
def join_token(ttl: str) -> None:
    """Print a token another node joins this cluster with."""
    seconds = parse_ttl(ttl)
    click.echo(_call(lambda p: p.node_join_token(seconds)))


@node.command("join")
@click.argument("token")
@click.option("--advertise", default="", metavar="ADDR", help="the address other nodes reach")
def join(token: str, advertise: str) -> None:
    """Join the cluster of TOKEN (from `zlayerctl node join-token`)."""
    from shared.wire import decode
    from shared.wire.cluster import NodeRecord

    record = decode(_call(lambda p: p.node_join(token, advertise)), NodeRecord)
    role = "an etcd member" if record.etcd_member else "a client of etcd"
    _said(record, f"joined the cluster as {role}")


@node.command("ls")
@format_option
def ls(output_format: str) -> None:
    """List the cluster's nodes: state, role, labels, resources."""
    from shared.wire import decode, to_builtins
    from shared.wire.cluster import NodeList

    found = decode(_call(lambda p: p.list_nodes()), NodeList)
    if output_format == "json":
        print_json(to_builtins(found))
        return
    print_rows(
        output_format,
        found.nodes,
        ["ID", "NAME", "ADDRESS", "STATE", "ROLE", "ETCD", "LABELS", "CPU", "MEMORY"],
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
        ],
    )


@node.command("label")
@click.argument("node_id", metavar="ID")
@click.argument("changes", nargs=-1, required=True, metavar="KEY=VALUE|KEY-...")
def label(node_id: str, changes: tuple[str, ...]) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of node ID."""
    labels, remove = parse_labels(changes)
    _call(lambda p: p.label_node(node_id, labels, remove))
    err_console.print(f"node {node_id} labelled", highlight=False)


@node.command("drain")
@click.argument("node_id", metavar="ID")
def drain(node_id: str) -> None:
    """Mark node ID draining: its replicas move to other nodes."""
    _call(lambda p: p.drain_node(node_id))
    err_console.print(f"node {node_id} is draining", highlight=False)


@node.command("rm")
@click.argument("node_id", metavar="ID")
def rm(node_id: str) -> None:
    """Remove node ID from the cluster (its record and its etcd member)."""
    _call(lambda p: p.remove_node(node_id))
    err_console.print(f"node {node_id} removed from the cluster", highlight=False)
