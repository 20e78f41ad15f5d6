"""overlayd's nftables table: NAT and forwarding for the bridge, and published ports.

ZLayer keeps its rules in one table of its own (family ``ip``), never in
someone else's. The ``nft`` command is the interface nftables documents and
keeps stable; every change is one ``nft -f`` transaction, so a reader (and a
packet) never sees half a ruleset.

The table:

- ``postrouting``: masquerade for replicas reaching out, for the node's own
  connections to a published port (127.0.0.1 sources) and for replicas
  reaching a published port that lands back on the bridge (hairpin);
- ``forward``: the bridge's traffic, dropped unless it is an answer, goes
  from replica to replica, goes out from a replica (masqueraded), or was
  DNATed to a published port. Traffic that neither enters nor leaves by
  the bridge is left to the host's own rules: a drop in this table is final
  for every table, so dropping it here would cut off the host's other
  networks (and other ZLayer bridges). IPv4 forwarding is a host-wide
  setting overlayd has to turn on (the uplinks carry the replicas' answers
  and published ports too), so this chain, not the setting, is what guards
  the node network;
- ``localnet``: overlayd lets the bridge carry 127.0.0.0/8 (route_localnet)
  so that the node's own connections to 127.0.0.1:<published port> work;
  anything else from the bridge to 127.0.0.0/8 is dropped, or a replica
  could reach every service bound to the node's loopback (CVE-2020-8558);
- ``prerouting`` and ``output``: packets to one of the node's own addresses
  go through ``published``, whose verdict map sends each published
  (protocol, port) to its deployment's chain, ``pub_<deployment>``, holding a
  DNAT rule per published port (round robin over the backends with
  ``numgen inc``). Only a connection's first packet walks NAT chains; the
  rest follow conntrack;
- ``closed``: on input, a published port with no backend in rotation
  rejects (tcp reset, icmp port unreachable) instead of swallowing packets;
- ``ct timeout udp_<N>s`` objects: a udp endpoint's ``session_timeout``;
- the sets ``peers`` (the other nodes of a cluster: their addresses and their
  replicas' blocks, let into the bridge) and ``peer_blocks`` (their blocks,
  reached unmasqueraded so a replica sees another node's replica's own
  address): empty on a lone node, filled by :func:`peers_update`;
- with the cluster's mesh, its WireGuard interface: TCP's MSS clamped to the
  route's MTU on the way in, and other nodes' blocks let through it both ways.

The table is rebuilt whole on start (:func:`ruleset`); a push rewrites one
deployment's chain plus the small ``published`` and ``closed`` chains
(:func:`deployment_update`). NAT decisions live in conntrack, so existing
connections keep their backend either way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network

from daemons.overlayd.publish import ProbeKey, PublishedPort, live_targets

Published = Mapping[str, list[PublishedPort]]
Down = Mapping[str, frozenset[ProbeKey]]
# The other nodes of a cluster: (their addresses and blocks, their blocks), as nft elements.
Peers = tuple[tuple[str, ...], tuple[str, ...]]


class NftError(Exception):
    """nft refused or is missing, in one sentence."""


def ruleset(
    table: str,
    bridge: str,
    subnet: IPv4Network,
    *,
    gateway: IPv4Address | None = None,
    dns_port: int = 53,
    published: Published | None = None,
    down: Down | None = None,
    peers: Peers = ((), ()),
    mesh: str = "",
) -> str:
    """The whole table, as a file for ``nft -f``: declared, deleted, then filled."""
    published = published or {}
    clamp, mesh_rules = _mesh_rules(bridge, mesh)
    down = down or {}
    gateway = gateway or next(subnet.hosts())
    objects = "".join(f"    {line}\n" for line in _timeout_objects(published))
    chains = "".join(
        _chain_block(_deployment_chain(name), _port_rules(ports, down.get(name, frozenset())))
        for name, ports in sorted(published.items())
    )
    return f"""\
table ip {table} {{}}
delete table ip {table}
table ip {table} {{
{objects}    set peers {{
        type ipv4_addr; flags interval; auto-merge;{_elements(peers[0])}
    }}
    set peer_blocks {{
        type ipv4_addr; flags interval; auto-merge;{_elements(peers[1])}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} ip daddr @peer_blocks accept comment "other nodes' replicas"
        ip saddr {subnet} oifname != "{bridge}" masquerade comment "replicas reach out"
        oifname "{bridge}" ct status dnat ip saddr 127.0.0.0/8 masquerade comment "from localhost"
        oifname "{bridge}" ct status dnat ip saddr {subnet} masquerade comment "hairpin"
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
{clamp}        iifname != "{bridge}" oifname != "{bridge}" accept comment "not the node network"
        ct state established,related accept comment "answers"
        iifname "{bridge}" oifname "{bridge}" accept comment "replica to replica"
        iifname "{bridge}" ip saddr {subnet} accept comment "replicas reach out"
        oifname "{bridge}" ct status dnat accept comment "published ports"
        oifname "{bridge}" ip saddr @peers accept comment "other nodes of the cluster"
{mesh_rules}    }}
    chain localnet {{
        type filter hook input priority filter; policy accept;
        iifname "{bridge}" ip daddr 127.0.0.0/8 ct status dnat accept comment "published ports"
        iifname "{bridge}" ip daddr 127.0.0.0/8 drop comment "the node's loopback"
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        fib daddr type local jump published
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        fib daddr type local jump published
    }}
{_chain_block("published", _dispatch_rules(published, gateway, dns_port))}\
    chain closed {{
        type filter hook input priority filter; policy accept;
{_indent(_closed_rules(published, down, gateway, dns_port))}\
    }}
{chains}}}
"""


def deployment_update(
    table: str,
    deployment: str,
    *,
    gateway: IPv4Address,
    dns_port: int,
    published: Published,
    down: Down,
) -> str:
    """A transaction that makes one deployment's chain match ``published`` (removing
    it if the deployment is not there) and rewrites the dispatch and reject chains."""
    lines = [f"add {obj}" for obj in _timeout_objects(published, table)]
    chain = _deployment_chain(deployment)
    lines.append(f"add chain ip {table} {chain}")
    lines.append(f"flush chain ip {table} {chain}")
    ports = published.get(deployment)
    if ports is not None:
        for rule in _port_rules(ports, down.get(deployment, frozenset())):
            lines.append(f"add rule ip {table} {chain} {rule}")
    lines.append(f"flush chain ip {table} published")
    for rule in _dispatch_rules(published, gateway, dns_port):
        lines.append(f"add rule ip {table} published {rule}")
    lines.append(f"flush chain ip {table} closed")
    for rule in _closed_rules(published, down, gateway, dns_port):
        lines.append(f"add rule ip {table} closed {rule}")
    if ports is None:
        # After the jump to it is gone, in the same transaction.
        lines.append(f"delete chain ip {table} {chain}")
    return "\n".join(lines) + "\n"


def _deployment_chain(deployment: str) -> str:
    return f"pub_{deployment}"


def _timeout_name(seconds: int) -> str:
    return f"udp_{seconds}s"


def _timeout_objects(published: Published, table: str = "") -> list[str]:
    seconds = sorted(
        {p.session_timeout for ports in published.values() for p in ports if p.session_timeout}
    )
    where = f"ip {table} " if table else ""
    return [
        f"ct timeout {where}{_timeout_name(s)} {{ protocol udp; l3proto ip; "
        f"policy = {{ unreplied: {s}, replied: {s} }}; }}"
        for s in seconds
    ]


def _dispatch_rules(published: Published, gateway: IPv4Address, dns_port: int) -> list[str]:
    """Service DNS first, then one verdict map from (protocol, port) to the deployment's
    chain: a new connection costs one lookup however many deployments publish ports,
    where a jump per deployment walked every chain before the right one."""
    rules = [
        f'ip daddr {gateway} {proto} dport {dns_port} return comment "service DNS"'
        for proto in ("udp", "tcp")
    ]
    entries = [
        f"{port.protocol} . {port.port} : jump {_deployment_chain(name)}"
        for name, ports in sorted(published.items())
        for port in sorted(ports, key=lambda p: p.key)
    ]
    if entries:
        rules.append(f"meta l4proto . th dport vmap {{ {', '.join(entries)} }}")
    return rules


def _port_rules(ports: list[PublishedPort], down: frozenset[ProbeKey]) -> list[str]:
    rules: list[str] = []
    for port in ports:
        targets = live_targets(port, down)
        if not targets:
            continue  # the closed chain rejects it
        match = f"{port.protocol} dport {port.port}"
        comment = f'comment "{port.service}/{_safe(port.endpoint)}"'
        if port.session_timeout:
            rules.append(f'{match} ct timeout set "{_timeout_name(port.session_timeout)}"')
        if len(targets) == 1:
            rules.append(f"{match} dnat to {targets[0]} {comment}")
            continue
        mapping = ", ".join(f"{i} : {t.address} . {t.port}" for i, t in enumerate(targets))
        rules.append(f"{match} dnat to numgen inc mod {len(targets)} map {{ {mapping} }} {comment}")
    return rules


def _closed_rules(
    published: Published, down: Down, gateway: IPv4Address, dns_port: int
) -> list[str]:
    rules: list[str] = []
    for name, ports in sorted(published.items()):
        for port in ports:
            if live_targets(port, down.get(name, frozenset())):
                continue
            guard = ""
            if port.port == dns_port:
                guard = f"ip daddr != {gateway} "
            verdict = "reject with tcp reset" if port.protocol == "tcp" else "reject"
            rules.append(
                f"{guard}{port.protocol} dport {port.port} {verdict} "
                f'comment "{name}/{port.service}: no backend in rotation"'
            )
    return rules


def _chain_block(name: str, rules: list[str]) -> str:
    return f"    chain {name} {{\n{_indent(rules)}    }}\n"


def _indent(rules: list[str]) -> str:
    return "".join(f"        {rule}\n" for rule in rules)


def _safe(text: str) -> str:
    """Text for an nft comment: no quotes or anything the parser would read."""
    return "".join(c if c.isalnum() or c in "-_./" else "_" for c in text)[:64]


def _elements(items: tuple[str, ...] | list[str]) -> str:
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def _mesh_rules(bridge: str, mesh: str) -> tuple[str, str]:
    """The forward chain's rules for the mesh interface: (first, last); empty without one.

    First, before any accept: TCP SYNs into the mesh carry an MSS that fits the
    route's MTU (the mesh interface's, below the underlay's), so a replica on
    a 1500-byte bridge never sends a segment the tunnel would have to
    fragment or drop. Last: the mesh carries other nodes' replicas both ways,
    as the ``peers`` set lets them in over plain routes.
    """
    if not mesh:
        return "", ""
    clamp = (
        f'        oifname "{mesh}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu '
        'comment "fits the mesh"\n'
    )
    rules = (
        f'        iifname "{mesh}" oifname "{bridge}" ip saddr @peer_blocks accept '
        'comment "the mesh: other nodes\' replicas in"\n'
        f'        iifname "{bridge}" oifname "{mesh}" ip daddr @peer_blocks accept '
        'comment "the mesh: to other nodes\' replicas"\n'
    )
    return clamp, rules


def peers_update(table: str, peers: Peers) -> str:
    """A transaction that sets the two peer sets to ``peers`` (addresses, blocks)."""
    lines = []
    for name, items in (("peers", peers[0]), ("peer_blocks", peers[1])):
        lines.append(f"flush set ip {table} {name}")
        if items:
            lines.append(f"add element ip {table} {name} {{ {', '.join(items)} }}")
    return "\n".join(lines) + "\n"


def apply(
    table: str,
    bridge: str,
    subnet: IPv4Network,
    *,
    gateway: IPv4Address | None = None,
    dns_port: int = 53,
    published: Published | None = None,
    down: Down | None = None,
    peers: Peers = ((), ()),
    mesh: str = "",
) -> None:
    text = ruleset(
        table,
        bridge,
        subnet,
        gateway=gateway,
        dns_port=dns_port,
        published=published,
        down=down,
        peers=peers,
        mesh=mesh,
    )
    _nft(["-f", "-"], text)


def run_transaction(text: str) -> None:
    """Apply a generated transaction (all of it or none of it)."""
    _nft(["-f", "-"], text)


def remove(table: str) -> bool:
    """Delete the table; False if it was not there."""
    if not exists(table):
        return False
    _nft(["delete", "table", "ip", table])
    return True


def exists(table: str) -> bool:
    out = _nft(["-j", "list", "tables", "ip"])
    tables = json.loads(out or "{}").get("nftables", [])
    return any(item.get("table", {}).get("name") == table for item in tables)


def rules(table: str) -> str:
    """The table as nft prints it (for people and tests)."""
    return _nft(["list", "table", "ip", table])


def _nft(args: list[str], stdin: str | None = None) -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise NftError("the nft command is missing; install the nftables package")
    result = subprocess.run(
        [nft, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise NftError(f"nft {' '.join(args)} failed: {message}")
    return result.stdout
