"""What must hold on every live node of a cluster once it has settled, after any step.

The one-node checker (:class:`tests.e2e.invariants.Invariants`) is run on each
live node, inside its network namespace and with its prefix and cgroup parent,
with what a node must run taken from the leader's placements in etcd
(``KEYS["assignments"]<node>``) instead of schedd's replica counts:

- the containers a node runs are exactly the replicas placed on it, each
  running with a PID that exists, and its agentd lists each once;
- each service's DNS on every node answers the healthy replicas of all nodes,
  in ``zlayerctl dns`` and in a real query to the node's service DNS;
- every node's proxyd routes every healthy replica of the cluster, and the
  routes it publishes (``KEYS["routed"]<node>``) are those;
- each node's mesh peers are the other live nodes, each with its block as its
  allowed IPs and, where it keeps the tunnel open (a keepalive), a session: a
  handshake within :data:`SESSION_WITHIN` (a peer dropped and added back on one
  side while the other kept its session has none, and nothing reaches it);
- nothing is orphaned on a node: no container, bundle, mount, namespace, veth,
  cgroup, conmon, IPAM allocation or saved view of a replica it is not given.

:meth:`ClusterInvariants.settle` polls :meth:`ClusterInvariants.differences`
until no node differs or a deadline passes, then fails with every difference.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from tests.cluster.harness import Cluster, Node
from tests.e2e.invariants import Endpoint, Invariants, Key, Snapshot, Unreadable, _key_name, _list

# WireGuard's Reject-After-Time: a session older than this carries nothing. A healthy
# one is renewed every 2 min (Rekey-After-Time, by its initiator) or a little later,
# so the age of the last handshake says nothing finer than this.
SESSION_WITHIN = 180.0


class NodeInvariants(Invariants):
    """The one-node invariants of a cluster node: in its namespace, its replicas
    those the leader placed on it."""

    def __init__(self, node: Node) -> None:
        super().__init__(node, netns=node.netns_path, cgroup_parent=node.cgroup_parent)  # type: ignore[arg-type]
        self.cluster_node = node


class ClusterInvariants:
    """The invariants of every live node of ``cluster`` (formed by node init and joins)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.nodes = {node.name: NodeInvariants(node) for node in cluster}
        self.verbose = False  # print each new list of differences while settling

    # ------------------------------------------------------------ reading

    def _etcd(self, prefix: str) -> dict[str, Any]:
        """Every key under ``prefix`` and its JSON value, read through a live voter."""
        for node in self.cluster:
            if not node.alive or node.behind_nat:
                continue
            files = node.paths.state_dir / "cluster"
            done = subprocess.run(
                [
                    "etcdctl",
                    f"--endpoints=https://{node.lan.ip}:2379",
                    f"--cacert={files / 'ca.crt'}",
                    f"--cert={files / 'node.crt'}",
                    f"--key={files / 'node.key'}",
                    "--command-timeout=5s",
                    "get",
                    "--prefix",
                    prefix,
                    "-w",
                    "json",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                continue
            kvs = json.loads(done.stdout).get("kvs") or []
            return {
                base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
                for kv in kvs
            }
        raise Unreadable(f"no etcd member answered a read of {prefix}")

    def _node_list(self, node: Node) -> dict[str, Any]:
        done = node.run("node", "ls", "--format", "json", timeout=30)
        if done.returncode != 0:
            raise Unreadable(f"`zlayerctl node ls` on {node.name} failed: {done.stderr.strip()}")
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    # ------------------------------------------------------------ the check

    def differences(self) -> list[str]:
        """Every way a live node differs from what must hold now, one sentence each."""
        from shared.wire.cluster import KEYS

        live = [node for node in self.cluster if node.alive]
        try:
            assignments = self._etcd(KEYS["assignments"])
            routed = self._etcd(KEYS["routed"])
            listings = {node.name: self._node_list(node) for node in live}
        except Unreadable as exc:
            return [str(exc)]
        listing = listings[live[0].name]
        ids = {record["name"]: record["id"] for record in listing["nodes"]}
        records = {record["id"]: record for record in listing["nodes"]}
        found: list[str] = []
        for node in self.cluster:
            listed = node.name in ids
            if node.alive and not listed:
                found.append(f"{node.name} runs but node ls does not list it")
            elif not node.alive and listed:
                found.append(f"{node.name} is down but node ls still lists it")
        snaps: dict[str, Snapshot] = {}
        for node in live:
            try:
                snaps[node.name] = self.nodes[node.name].read()
            except Unreadable as exc:
                found.append(f"{node.name}: {exc}")
        if found:
            return found
        # Every node's healthy replicas, as each node's own agentd lists them.
        healthy: dict[Key, str] = {}
        placed: dict[str, dict[Key, str]] = {}
        desired: dict[str, dict[str, dict[str, Any]]] = {}
        for node in live:
            checker, snap = self.nodes[node.name], snaps[node.name]
            mine = ids.get(node.name, "")
            snap.replicas = [r for r in snap.replicas if r.get("node") == mine]
            said: list[str] = []
            desired, _ = checker._desired(snap, said)
            found += [f"{node.name}: {line}" for line in said]
            wanted = self._placed(assignments.get(KEYS["assignments"] + mine))
            placed[node.name] = wanted
            healthy |= checker._replicas(snap, wanted, [])
        for node in live:
            checker, snap = self.nodes[node.name], snaps[node.name]
            checker.last = snap
            wanted = placed[node.name]
            lines: list[str] = []
            lines += checker._daemons(snap)
            checker._replicas(snap, wanted, lines)
            lines += checker._runtime(snap, wanted)
            lines += checker._dns(snap, desired, healthy)
            lines += checker._dns_served(desired, healthy)
            lines += checker._routes(snap, desired, healthy)
            try:
                lines += checker._orphans(snap, desired, wanted, healthy)
            except OSError as exc:
                lines.append(f"reading the leftovers failed ({exc}); not settled yet")
            lines += self._published_routes(routed.get(KEYS["routed"] + ids[node.name]), healthy)
            lines += self._mesh(node, listings[node.name], live, ids, records)
            found += [f"{node.name}: {line}" for line in lines]
        for key in assignments:
            owner = key.rsplit("/", 1)[1]
            if owner not in {ids.get(node.name) for node in live}:
                left = len(assignments[key].get("replicas", []))
                if left:
                    found.append(f"node {owner}, not live, is still given {left} replicas")
        return found

    @staticmethod
    def _placed(doc: dict[str, Any] | None) -> dict[Key, str]:
        wanted: dict[Key, str] = {}
        for placement in (doc or {}).get("replicas", []):
            instance = int(placement["replica"].rsplit("-", 1)[1])
            key = (placement["deployment"], placement["service"], instance, placement["revision"])
            wanted[key] = _key_name(key)
        return wanted

    @staticmethod
    def _published_routes(doc: dict[str, Any] | None, healthy: dict[Key, str]) -> list[str]:
        """The backends a node says its proxyd routes: every healthy replica, by service."""
        want: dict[str, set[str]] = {}
        for (deployment, service, _instance, _revision), address in healthy.items():
            want.setdefault(f"{deployment}/{service}", set()).add(address)
        have = {
            name: {b.rsplit(":", 1)[0] for b in backends}
            for name, backends in (doc or {}).get("routes", {}).items()
            if backends
        }
        found = []
        for name in sorted(set(want) | set(have)):
            if want.get(name, set()) != have.get(name, set()):
                found.append(
                    f"its published routes hold {_list(have.get(name, set()))} for {name}; "
                    f"the healthy replicas are {_list(want.get(name, set()))}"
                )
        return found

    def _mesh(
        self,
        node: Node,
        listing: dict[str, Any],
        live: list[Node],
        ids: dict[str, str],
        records: dict[str, Any],
    ) -> list[str]:
        """Its mesh peers are the other live nodes, each with its block as allowed IPs and,
        with a keepalive, a handshake within :data:`SESSION_WITHIN`."""
        mesh = listing.get("mesh") or {}
        if not mesh.get("enabled"):
            return [f"its mesh is off: {mesh.get('reason', '')}"]
        peers = {peer["public_key"]: peer for peer in mesh.get("peers", [])}
        want = {
            records[ids[other.name]]["wireguard_key"]: records[ids[other.name]]
            for other in live
            if other is not node and other.name in ids
        }
        found = []
        now = time.time()  # the handshakes are Unix times, read on this machine
        for key, record in sorted(want.items(), key=lambda item: item[1]["name"]):
            peer = peers.get(key)
            if peer is None:
                found.append(f"its mesh has no peer for {record['name']}")
            elif sorted(peer["allowed_ips"]) != [record["subnet"]]:
                found.append(
                    f"its mesh peer {record['name']} allows {_list(peer['allowed_ips'])}, "
                    f"not its block {record['subnet']}"
                )
            elif peer["keepalive"] and now - peer["last_handshake"] > SESSION_WITHIN:
                said = (
                    f"{now - peer['last_handshake']:.0f} s ago"
                    if peer["last_handshake"]
                    else "never"
                )
                found.append(
                    f"its mesh peer {record['name']} has no session: last handshake {said} "
                    f"(endpoint {peer['endpoint'] or 'none'})"
                )
        for key in sorted(set(peers) - set(want)):
            found.append(f"its mesh keeps a peer {key[:8]}… that is no live node of the cluster")
        return found

    def settle(self, what: str, timeout: float = 60.0) -> float:
        """Wait until every invariant holds on every live node; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        shown: list[str] = []
        while True:
            found = self.differences()
            if not found:
                return time.monotonic() - started
            if found != shown and self.verbose:
                at = time.monotonic() - started
                print(f"{what}, {at:.1f}s:\n" + "\n".join(f"  - {line}" for line in found))
                shown = found
            if time.monotonic() >= deadline:
                lines = "\n".join(f"  - {line}" for line in found)
                raise AssertionError(
                    f"after {what}, the cluster did not settle within {timeout:.0f}s:\n{lines}"
                )
            time.sleep(0.3)

    def expect(self, deployment: str, endpoints: Iterable[Endpoint]) -> None:
        """The endpoints ``deployment``'s spec declares: every node must route them (and
        know the deployment even once no daemon names it)."""
        wanted = list(endpoints)
        for checker in self.nodes.values():
            checker.expect(deployment, wanted)
