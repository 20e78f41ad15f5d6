"""One checker of what must hold on a node once it has settled, after any step.

What a user has (``zlayerctl status``, ``ps``, ``ps --containers``, ``dns``,
``routes``) is set against the node itself (agentd's OCI runtime root, the
bridge's ports, network namespaces, overlayd's nft table and allocations,
cgroups, conmon processes, mounts under the prefix, the views the daemons
saved):

- the containers that run are schedd's desired replicas (deployment, service,
  instance, revision; as many as desired), each with a PID that exists;
- the service DNS answers each name with exactly the healthy replicas' addresses
  (in ``zlayerctl dns`` and in a real query to the DNS server on the bridge);
- proxyd's routes and overlayd's published ports are the desired endpoints,
  each with exactly the healthy replicas as backends;
- nothing is orphaned: no container, bundle, mount, network namespace, veth,
  nft chain or rule, cgroup, process, IPAM allocation or saved view of a
  replica or deployment that schedd no longer wants.

:meth:`Invariants.settle` polls :meth:`Invariants.differences` until the list is
empty or a deadline passes, then fails with every difference in plain words.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemons.overlayd.plumbing import NETNS_DIR, names_for
from daemons.overlayd.settings import OverlaySettings
from shared.proc import alive
from tests.e2e.node import Node

DOMAIN = "service.local"
IN_ROTATION = ("healthy", "none")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "zlayer"
DAEMON_NAMES = ("schedd", "agentd", "registryd", "overlayd", "proxyd", "apid")
ADDRESS_PORT = re.compile(r"(\d+\.\d+\.\d+\.\d+)\s*(?:\.|:)\s*(\d+)")

# (deployment, service, instance, revision)
Key = tuple[str, str, int, int]


@dataclass(frozen=True)
class Endpoint:
    """One endpoint as the spec declares it: what the checker expects to be served."""

    service: str
    protocol: str  # http, tcp, ...
    port: int
    target_port: int
    public: bool = True


@dataclass
class Snapshot:
    """Everything one pass read, kept so a failure can show it."""

    daemons: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    dns: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    containers: list[dict[str, Any]] = field(default_factory=list)
    nft: str = ""


class Unreadable(Exception):
    """A user's command did not answer; the pass cannot judge the rest."""


def _key_name(key: Key) -> str:
    deployment, service, instance, revision = key
    return f"{deployment}-{service}-{instance}-r{revision}"


class Invariants:
    """The invariants of one node. ``endpoints`` maps a deployment to the endpoints
    its spec declares (tests pass what they deployed); without it, routes and
    published ports are checked only for the backends they hold."""

    def __init__(
        self, node: Node, *, netns: Path | None = None, cgroup_parent: str = CGROUP_PARENT
    ) -> None:
        self.node = node
        self.paths = node.paths
        # A node in a network namespace of its own (a cluster's): its bridge, links,
        # nft table and service DNS are read from inside it.
        self.netns = netns
        self.cgroup_parent = cgroup_parent
        self.endpoints: dict[str, list[Endpoint]] = {}
        # Every deployment and container id this checker has seen, so that
        # what they leave behind is found even when no daemon names them any more.
        self.deployments_seen: set[str] = set()
        self.ids_seen: set[str] = set()
        self.last: Snapshot = Snapshot()
        settings = OverlaySettings.load("overlayd", self.paths)
        self.bridge = settings.bridge
        self.table = settings.table
        self.dns_server = (str(settings.subnet.network_address + 1), settings.dns_port)

    def expect(self, deployment: str, endpoints: Iterable[Endpoint]) -> None:
        """The endpoints ``deployment``'s spec declares (replaces what was given before)."""
        self.deployments_seen.add(deployment)
        self.endpoints[deployment] = list(endpoints)

    # ------------------------------------------------------------ reading

    def _ctl_json(self, *args: str) -> Any:
        try:
            result = self.node.ctl(*args, "--format", "json", timeout=30)
        except AssertionError as exc:  # a traceback is a finding in itself
            raise Unreadable(f"`zlayerctl {' '.join(args)}` crashed: {exc}") from None
        except subprocess.TimeoutExpired:
            raise Unreadable(f"`zlayerctl {' '.join(args)}` did not answer in 30s") from None
        if result.returncode != 0 and not result.stdout.strip():
            why = " ".join(result.stderr.split())[:300]
            raise Unreadable(f"`zlayerctl {' '.join(args)}` failed ({result.returncode}): {why}")
        return json.loads(result.stdout)

    def _runtime_containers(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for runtime in ("crun", "runc"):
            root = self.paths.run_dir / "agentd" / runtime
            if not root.is_dir() or shutil.which(runtime) is None:
                continue
            out = subprocess.run(
                [runtime, f"--root={root}", "list", "--format", "json"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            for item in json.loads(out.stdout or "[]") or []:
                item["runtime"] = runtime
                found.append(item)
        return found

    def _inside(self, *command: str) -> list[str]:
        """``command`` as run in the node's network namespace."""
        return [*(["nsenter", f"--net={self.netns}", "--"] if self.netns else []), *command]

    def _nft(self) -> str:
        out = subprocess.run(
            self._inside("nft", "list", "table", "ip", self.table),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return out.stdout if out.returncode == 0 else ""

    def read(self) -> Snapshot:
        snap = Snapshot()
        status = self.node.ctl("status", "--format", "json", timeout=30)
        snap.daemons = json.loads(status.stdout) if status.stdout.strip() else []
        snap.deployments = self._ctl_json("ps")
        snap.replicas = self._ctl_json("ps", "--containers")
        snap.dns = self._ctl_json("dns")
        snap.routes = self._ctl_json("routes")
        snap.containers = self._runtime_containers()
        snap.nft = self._nft()
        return snap

    # ------------------------------------------------------------ the check

    def differences(self) -> list[str]:
        """Every way the node differs from what must hold now, one sentence each."""
        try:
            snap = self.read()
        except Unreadable as exc:
            return [str(exc)]
        self.last = snap
        found: list[str] = []
        found += self._daemons(snap)
        desired, wanted = self._desired(snap, found)
        healthy = self._replicas(snap, wanted, found)
        found += self._runtime(snap, wanted)
        found += self._dns(snap, desired, healthy)
        found += self._dns_served(desired, healthy)
        found += self._routes(snap, desired, healthy)
        found += self._published(snap, desired, healthy)
        try:
            found += self._orphans(snap, desired, wanted, healthy)
        except OSError as exc:  # something vanished while it was read: read again
            found.append(f"reading the node's leftovers failed ({exc}); not settled yet")
        return found

    def settle(self, what: str, timeout: float = 60.0) -> float:
        """Wait until every invariant holds; the seconds it took. Fails with the list."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            found = self.differences()
            if not found:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise AssertionError(self.describe(what, found, timeout))
            time.sleep(0.3)  # a poll of the node itself takes longer than this

    @staticmethod
    def describe(what: str, found: list[str], timeout: float) -> str:
        lines = "\n".join(f"  - {line}" for line in found)
        return f"after {what}, the node did not settle within {timeout:.0f}s:\n{lines}"

    # ------------------------------------------------------------ the parts

    def _daemons(self, snap: Snapshot) -> list[str]:
        rows = {r.get("name"): r for r in snap.daemons}
        found = []
        for name in DAEMON_NAMES:
            row = rows.get(name)
            if row is None:
                found.append(f"zlayerctl status does not list zlayer-{name}")
            elif row.get("state") != "running":
                found.append(f"zlayer-{name} is {row.get('state')} ({row.get('detail', '')})")
        return found

    def _desired(
        self, snap: Snapshot, found: list[str]
    ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[Key, str]]:
        """schedd's view: per deployment its services, and the replicas it wants."""
        desired: dict[str, dict[str, dict[str, Any]]] = {}
        wanted: dict[Key, str] = {}
        for deployment in snap.deployments:
            name = deployment["name"]
            self.deployments_seen.add(name)
            if deployment.get("state") == "removing":
                found.append(f"deployment {name} is still being removed")
                continue
            services = desired.setdefault(name, {})
            for svc in deployment["services"]:
                if svc.get("rtype", "service") != "service":
                    continue
                services[svc["name"]] = svc
                if svc.get("rollout") == "running":
                    found.append(
                        f"{name}/{svc['name']}: a rollout is still running ({svc.get('message')})"
                    )
                for instance in range(1, int(svc["desired"]) + 1):
                    key = (name, svc["name"], instance, int(svc["revision"]))
                    wanted[key] = _key_name(key)
        return desired, wanted

    def _replicas(self, snap: Snapshot, wanted: dict[Key, str], found: list[str]) -> dict[Key, str]:
        """agentd's replicas against schedd's; the addresses of the healthy wanted ones."""
        have: dict[Key, list[dict[str, Any]]] = {}
        for replica in snap.replicas:
            self.ids_seen.add(replica["id"])
            key = (
                replica["deployment"],
                replica["service"],
                int(replica["instance"]),
                int(replica["revision"]),
            )
            have.setdefault(key, []).append(replica)
        healthy: dict[Key, str] = {}
        for key in sorted(wanted):
            rows = have.get(key, [])
            deployment, service, instance, revision = key
            what = f"{deployment}/{service}: replica {instance} of revision {revision}"
            if not rows:
                found.append(f"{what} is desired, but agentd lists no such replica")
                continue
            if len(rows) > 1:
                found.append(f"{what} is listed {len(rows)} times by agentd: {rows}")
            row = rows[0]
            if row["state"] != "running":
                found.append(f"{what} is {row['state']}: {row.get('message', '')}")
                continue
            if not alive(int(row.get("pid") or 0)):
                found.append(f"{what} ({row['id']}) has pid {row.get('pid')}, which does not run")
            if row.get("health") not in IN_ROTATION:
                found.append(f"{what} ({row['id']}) is running but {row.get('health')}")
                continue
            if row.get("address"):
                healthy[key] = row["address"]
        for key, rows in sorted(have.items()):
            if key in wanted:
                continue
            for row in rows:
                if row.get("rtype", "service") != "service":
                    continue
                found.append(
                    f"agentd lists {row['id']} ({row['state']}, pid {row.get('pid')}), which "
                    f"schedd does not want ({self._why_unwanted(key, wanted)})"
                )
        return healthy

    def _why_unwanted(self, key: Key, wanted: dict[Key, str]) -> str:
        deployment, service, instance, revision = key
        mine = [k for k in wanted if k[0] == deployment and k[1] == service]
        if not any(k[0] == deployment for k in wanted) and deployment not in {
            d["name"] for d in self.last.deployments
        }:
            return f"schedd has no deployment {deployment}"
        if not mine:
            return f"schedd wants no replica of {deployment}/{service}"
        revisions = sorted({k[3] for k in mine})
        if revision not in revisions:
            return f"schedd serves revision {', '.join(map(str, revisions))}, not {revision}"
        return f"schedd wants {len(mine)} replicas, this is instance {instance}"

    def _runtime(self, snap: Snapshot, wanted: dict[Key, str]) -> list[str]:
        """agentd's OCI runtime root: exactly the wanted containers, each running."""
        found = []
        by_id: dict[str, dict[str, Any]] = {}
        for item in snap.containers:
            self.ids_seen.add(item["id"])
            by_id[item["id"]] = item
        for cid in sorted(set(wanted.values()) - set(by_id)):
            found.append(f"{cid} is desired, but agentd's runtime root has no such container")
        for cid, item in sorted(by_id.items()):
            if cid not in wanted.values():
                found.append(
                    f"container {cid} ({item.get('status')}, pid {item.get('pid')}) is left "
                    f"under agentd's runtime root; schedd wants no such replica"
                )
            elif item.get("status") != "running":
                found.append(f"container {cid} is {item.get('status')} under the runtime root")
            elif not alive(int(item.get("pid") or 0)):
                found.append(f"container {cid}: the runtime's pid {item.get('pid')} does not run")
        agent_pids = {r["id"]: r.get("pid") for r in snap.replicas if r.get("state") == "running"}
        for cid, pid in sorted(agent_pids.items()):
            item = by_id.get(cid)
            if item is not None and item.get("pid") and pid and int(item["pid"]) != int(pid):
                found.append(f"{cid}: agentd reports pid {pid}, the runtime pid {item['pid']}")
        return found

    def _dns(
        self,
        snap: Snapshot,
        desired: dict[str, dict[str, dict[str, Any]]],
        healthy: dict[Key, str],
    ) -> list[str]:
        expected: dict[tuple[str, str], set[str]] = {}
        for (deployment, service, instance, _rev), address in healthy.items():
            for suffix in (DOMAIN, f"{deployment}.{DOMAIN}"):
                for name in (
                    f"{service}.{suffix}",
                    f"{service}-{instance}.{service}.{suffix}",
                    f"{instance}.{service}.{suffix}",
                ):
                    expected.setdefault((deployment, name), set()).add(address)
        actual: dict[tuple[str, str], set[str]] = {}
        for record in snap.dns:
            actual.setdefault((record["deployment"], record["name"]), set()).update(
                record["addresses"]
            )
        found = []
        for deployment, name in sorted(set(expected) | set(actual)):
            want = expected.get((deployment, name), set())
            have = actual.get((deployment, name), set())
            if want == have:
                continue
            gone = "" if deployment in desired else f" (schedd has no deployment {deployment})"
            if not want:
                found.append(
                    f"DNS answers {name} with {_list(have)} for {deployment}{gone}; "
                    "no healthy replica has these addresses"
                )
            elif not have:
                found.append(f"DNS has no address for {name} ({deployment}); want {_list(want)}")
            else:
                found.append(
                    f"DNS answers {name} ({deployment}) with {_list(have)}; "
                    f"the healthy replicas are {_list(want)}"
                )
        return found

    def _dns_served(
        self, desired: dict[str, dict[str, dict[str, Any]]], healthy: dict[Key, str]
    ) -> list[str]:
        """What the service DNS itself answers for ``{service}.service.local``: every
        deployment's healthy replicas of that service, no other address."""
        services = {svc for services in desired.values() for svc in services}
        services |= {e.service for endpoints in self.endpoints.values() for e in endpoints}
        found = []
        answers = self._resolve_all([f"{service}.{DOMAIN}" for service in sorted(services)])
        for service in sorted(services):
            name = f"{service}.{DOMAIN}"
            want = {a for k, a in healthy.items() if k[1] == service}
            have = answers.get(name)
            if have is None:
                found.append(f"the service DNS on {self.dns_server[0]} did not answer {name}")
            elif have != want:
                found.append(
                    f"the service DNS answers {name} with {_list(have)}; "
                    f"the healthy replicas are {_list(want)}"
                )
        return found

    def _resolve_all(self, names: list[str]) -> dict[str, set[str] | None]:
        """What the service DNS answers for each name (None: no answer); in the node's
        namespace, all names in one process."""
        if self.netns is None or not names:
            return {name: _resolve(self.dns_server, name) for name in names}
        code = (
            "import json, sys; from tests.e2e.invariants import _resolve; "
            "server = (sys.argv[1], int(sys.argv[2])); "
            "found = {n: _resolve(server, n) for n in sys.argv[3:]}; "
            "print(json.dumps({n: None if a is None else sorted(a) for n, a in found.items()}))"
        )
        server, port = self.dns_server
        done = subprocess.run(
            self._inside(sys.executable, "-c", code, server, str(port), *names),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).resolve().parents[2],  # where ``tests`` imports from
        )
        with contextlib.suppress(ValueError):
            answers = json.loads(done.stdout)
            return {n: None if answers.get(n) is None else set(answers[n]) for n in names}
        return dict.fromkeys(names)

    def _links(self) -> tuple[set[str], set[str]]:
        """The node's links, and those of them on its bridge."""
        if self.netns is None:
            return set(os.listdir("/sys/class/net")), _bridge_ports(self.bridge)
        done = subprocess.run(
            self._inside("ip", "-j", "link", "show"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        links = json.loads(done.stdout or "[]")
        names = {link["ifname"] for link in links}
        return names, {link["ifname"] for link in links if link.get("master") == self.bridge}

    def _healthy_of(self, healthy: dict[Key, str], deployment: str, service: str) -> set[str]:
        return {a for k, a in healthy.items() if k[0] == deployment and k[1] == service}

    def _routes(
        self,
        snap: Snapshot,
        desired: dict[str, dict[str, dict[str, Any]]],
        healthy: dict[Key, str],
    ) -> list[str]:
        found = []
        seen: set[tuple[str, str, str]] = set()
        for route in snap.routes:
            deployment, service = route["deployment"], route["service"]
            backends = set(route.get("backends") or [])
            where = f"{route['protocol']} {route['listen']} host {route.get('host') or '*'}"
            where += f" path {route.get('path', '/')}"
            seen.add((deployment, service, route.get("endpoint", "")))
            if deployment not in desired:
                found.append(
                    f"proxyd still routes {where} to {deployment}/{service} "
                    f"(backends {_list(backends)}), and schedd has no deployment {deployment}"
                )
                continue
            want = self._healthy_of(healthy, deployment, service)
            ports = {e.target_port for e in self.endpoints.get(deployment, []) if e.service}
            have_addresses = {b.rsplit(":", 1)[0] for b in backends}
            if have_addresses != want:
                found.append(
                    f"proxyd routes {where} of {deployment}/{service} to {_list(backends)}; "
                    f"the healthy replicas are {_list(want)}"
                )
            elif ports and any(int(b.rsplit(":", 1)[1]) not in ports for b in backends):
                found.append(f"proxyd routes {deployment}/{service} to ports {_list(backends)}")
        for deployment, services in sorted(desired.items()):
            for endpoint in self.endpoints.get(deployment, []):
                if endpoint.protocol not in ("http", "https", "websocket") or not endpoint.public:
                    continue
                if endpoint.service not in services:
                    continue
                routed = any(s[0] == deployment and s[1] == endpoint.service for s in seen)
                if not routed and self._healthy_of(healthy, deployment, endpoint.service):
                    found.append(
                        f"proxyd has no route for {deployment}/{endpoint.service}'s "
                        f"{endpoint.protocol} endpoint on port {endpoint.port}"
                    )
        return found

    def _published(
        self,
        snap: Snapshot,
        desired: dict[str, dict[str, dict[str, Any]]],
        healthy: dict[Key, str],
    ) -> list[str]:
        """overlayd's nft table: one chain per deployment with published ports."""
        found = []
        chains = _nft_chains(snap.nft)
        for chain, rules in sorted(chains.items()):
            if chain.startswith("pub_"):
                deployment = chain[4:]
                targets = {t for rule in rules for t in _dnat_targets(rule)}
                if deployment not in desired:
                    found.append(
                        f"nft chain {chain} of table {self.table} is left "
                        f"(DNAT to {_list(targets) or 'nothing'}); "
                        f"schedd has no deployment {deployment}"
                    )
                    continue
                for rule in rules:
                    match = re.search(r"\b(tcp|udp) dport (\d+)\b", rule)
                    if not match or "dnat" not in rule:
                        continue
                    port = int(match.group(2))
                    service = self._service_on_port(deployment, port)
                    have = {t.rsplit(":", 1)[0] for t in _dnat_targets(rule)}
                    want = self._healthy_of(healthy, deployment, service) if service else set()
                    if service is None:
                        want = {a for k, a in healthy.items() if k[0] == deployment}
                    if have != want:
                        found.append(
                            f"nft sends {match.group(1)} {port} to {_list(have)} for "
                            f"{deployment}; the healthy replicas are {_list(want)}"
                        )
            elif chain == "closed":
                for rule in rules:
                    comment = re.search(r'comment "([^/"]+)/', rule)
                    if comment and comment.group(1) not in desired:
                        found.append(
                            f"nft chain closed still names {comment.group(1)}, which schedd "
                            f"does not have: {rule.strip()}"
                        )
        for deployment, services in sorted(desired.items()):
            for endpoint in self.endpoints.get(deployment, []):
                if endpoint.protocol not in ("tcp", "udp") or not endpoint.public:
                    continue
                if endpoint.service not in services:
                    continue
                want = self._healthy_of(healthy, deployment, endpoint.service)
                rules = chains.get(f"pub_{deployment}", [])
                served = [
                    r for r in rules if f"{endpoint.protocol} dport {endpoint.port} " in r + " "
                ]
                if want and not any("dnat" in r for r in served):
                    found.append(
                        f"nft publishes no {endpoint.protocol} {endpoint.port} for "
                        f"{deployment}/{endpoint.service}; want {_list(want)}"
                    )
        return found

    def _service_on_port(self, deployment: str, port: int) -> str | None:
        for endpoint in self.endpoints.get(deployment, []):
            if endpoint.port == port and endpoint.protocol in ("tcp", "udp"):
                return endpoint.service
        return None

    # ------------------------------------------------------------ orphans

    def _orphans(
        self,
        snap: Snapshot,
        desired: dict[str, dict[str, dict[str, Any]]],
        wanted: dict[Key, str],
        healthy: dict[Key, str],
    ) -> list[str]:
        found: list[str] = []
        ids = set(wanted.values())
        agent_state = self.paths.daemon_state("agentd")
        bundles = agent_state / "bundles"
        bundle_ids = {p.name for p in bundles.iterdir()} if bundles.is_dir() else set()
        self.ids_seen |= bundle_ids
        for cid in sorted(bundle_ids - ids):
            found.append(f"the bundle of {cid} is left in agentd's state")
        records = agent_state / "replicas"
        for path in sorted(records.glob("*.json")) if records.is_dir() else []:
            if path.stem not in ids:
                found.append(f"agentd keeps a record of {path.stem}, which schedd does not want")
        # Mounts under the prefix belong to wanted replicas' bundles only.
        for point in _mounts_under(self.paths.prefix):
            inside = Path(point).relative_to(bundles) if point.startswith(f"{bundles}/") else None
            if inside is None:
                found.append(f"{point} is mounted and belongs to no replica")
            elif inside.parts[0] not in ids:
                found.append(f"{point} is still mounted; schedd wants no replica {inside.parts[0]}")
        # IPAM allocations: exactly the wanted replicas on the node network.
        allocations = _allocations(self.paths.daemon_state("overlayd") / "allocations.json")
        self.ids_seen |= set(allocations)
        for cid, held in sorted(allocations.items()):
            if cid not in ids:
                found.append(
                    f"overlayd still allocates {held.get('address')} to {cid}, "
                    "which schedd does not want"
                )
        for key, cid in sorted(wanted.items()):
            held = allocations.get(cid, {}).get("address")
            if key in healthy and held and held != healthy[key]:
                found.append(f"{cid}: agentd says {healthy[key]}, overlayd allocated {held}")
        # Network namespaces and veths, by the names overlayd derives from an id.
        links, ports = self._links()
        expected_veths = {names_for(self.bridge, cid).host_veth for cid in ids}
        for port in sorted(ports - expected_veths):
            owner = next(
                (c for c in self.ids_seen if names_for(self.bridge, c).host_veth == port), None
            )
            found.append(
                f"veth {port} is left on the bridge {self.bridge}"
                + (f" (it was {owner}'s)" if owner else "")
            )
        for cid in sorted(self.ids_seen - ids):
            names = names_for(self.bridge, cid)
            if (NETNS_DIR / names.netns).exists():
                found.append(f"network namespace {names.netns} of {cid} is left")
            if names.host_veth in links and names.host_veth not in ports:
                found.append(f"veth {names.host_veth} of {cid} is left (off the bridge)")
        # Cgroups and the processes in them.
        for cgroup in _cgroups(self._ours, self.cgroup_parent):
            cid = cgroup.name
            if cid in ids:
                continue
            procs = _cgroup_procs(cgroup)
            found.append(
                f"cgroup {cgroup} of {cid} is left"
                + (f" with processes {_describe_pids(procs)}" if procs else "")
            )
        # conmon processes of this node that hold no wanted replica.
        for proc in _conmons(self.paths.prefix):
            cid = _conmon_cid(proc)
            if cid and cid not in ids:
                found.append(f"conmon (pid {proc.pid}) still holds {cid}")
        # Views the daemons saved: nothing of a deployment schedd no longer has.
        for daemon in ("agentd", "overlayd", "proxyd"):
            for path, view in _saved_views(self.paths.daemon_state(daemon)):
                deployment = view["deployment"]
                where = path.relative_to(self.paths.daemon_state(daemon))
                if deployment not in desired:
                    count = _backend_count(view)
                    found.append(
                        f"{daemon} keeps a saved view of {deployment} in {where}"
                        + (f" with {count} backends" if count else "")
                        + f"; schedd has no deployment {deployment}"
                    )
                    continue
                for service in view.get("services", []) if daemon != "agentd" else []:
                    have = {b.get("address") for b in service.get("backends", [])}
                    want = self._healthy_of(healthy, deployment, service.get("service", ""))
                    if have != want:
                        found.append(
                            f"{daemon}'s saved view {where} holds {_list(have)} as backends of "
                            f"{deployment}/{service.get('service')}; healthy are {_list(want)}"
                        )
        return found

    def _ours(self, cid: str) -> bool:
        return any(cid.startswith(f"{d}-") for d in self.deployments_seen) or cid in self.ids_seen


# ---------------------------------------------------------------- node readers


def _resolve(server: tuple[str, int], name: str) -> set[str] | None:
    """The A records a DNS server gives for ``name`` (empty for NXDOMAIN); None if
    it does not answer twice in a row."""
    from dnslib import QTYPE, DNSRecord

    query = DNSRecord.question(name).pack()
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            try:
                sock.sendto(query, server)
                reply = DNSRecord.parse(sock.recvfrom(4096)[0])
            except OSError:
                continue
        return {str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A}
    return None


def _list(items: Iterable[str]) -> str:
    ordered = sorted(items)
    return ", ".join(ordered) if ordered else "none"


def _mounts_under(prefix: Path) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4].replace("\\040", " ") for line in handle]
    return sorted(p for p in points if p.startswith(f"{prefix}/"))


def _allocations(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    held = data.get("allocations", {}) if isinstance(data, dict) else {}
    return held if isinstance(held, dict) else {}


def _bridge_ports(bridge: str) -> set[str]:
    brif = Path(f"/sys/class/net/{bridge}/brif")
    return {p.name for p in brif.iterdir()} if brif.is_dir() else set()


def _cgroups(ours: Any, parent_name: str = CGROUP_PARENT) -> list[Path]:
    found = []
    for controller in CGROUP_ROOT.iterdir():
        parent = controller / parent_name
        if not parent.is_dir():
            continue
        found += [d for d in parent.iterdir() if d.is_dir() and ours(d.name)]
    return sorted(found)


def _cgroup_procs(cgroup: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    return []


def _describe_pids(pids: list[int]) -> str:
    out = []
    for pid in pids[:5]:
        try:
            out.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:60]})")
        except psutil.Error:
            out.append(str(pid))
    return ", ".join(out) + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")


def _conmons(prefix: Path) -> Iterator[psutil.Process]:
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["name"] != "conmon" or not any(str(prefix) in a for a in cmdline):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        yield proc


def _conmon_cid(proc: psutil.Process) -> str:
    try:
        args = proc.cmdline()
    except psutil.Error:
        return ""
    for flag in ("-c", "--cid"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return ""


def _nft_chains(text: str) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        match = re.match(r"chain (\S+) \{", stripped)
        if match:
            current = chains.setdefault(match.group(1), [])
        elif stripped == "}":
            current = None
        elif current is not None and stripped and not stripped.startswith(("type ", "policy ")):
            current.append(stripped)
    return chains


def _dnat_targets(rule: str) -> set[str]:
    if "dnat" not in rule:
        return set()
    tail = rule.split("dnat", 1)[1]
    return {f"{a}:{p}" for a, p in ADDRESS_PORT.findall(tail)}


def _saved_views(state_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every per-deployment object a daemon saved: a traffic view (``deployment`` and
    ``services``) or an assignment (``deployment`` and ``service``), in any JSON file
    under its state directory, however the file nests them."""
    if not state_dir.is_dir():
        return
    for path in _json_files(state_dir, skip={"bundles", "job-runs", "replicas", "volumes"}):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        seen: set[str] = set()
        for view in _views_in(data):
            marker = f"{view['deployment']}/{view.get('service', '')}"
            if marker not in seen:
                seen.add(marker)
                yield path, view


def _json_files(root: Path, skip: set[str]) -> list[Path]:
    """The JSON files under ``root``, not descending into ``skip``; files and
    directories that vanish while walked (a daemon removing them) are left out."""
    found = []
    for directory, subdirs, files in os.walk(root, onerror=lambda _error: None):
        subdirs[:] = [d for d in subdirs if d not in skip]
        found += [Path(directory) / f for f in files if f.endswith(".json")]
    return sorted(found)


def _views_in(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        if isinstance(data.get("deployment"), str) and ("services" in data or "service" in data):
            yield data
            return
        for value in data.values():
            yield from _views_in(value)
    elif isinstance(data, list):
        for value in data:
            yield from _views_in(value)


def _backend_count(view: dict[str, Any]) -> int:
    return sum(len(s.get("backends", [])) for s in view.get("services", []) or [])


def log_lines(node: Node, words: Iterable[str], limit: int = 40) -> list[str]:
    """The daemons' log lines that mention any of ``words`` or warn, newest last."""
    wanted = [w for w in words if w]
    picked: list[tuple[str, str]] = []
    for daemon in DAEMON_NAMES:
        for name in (f"{daemon}.log.1", f"{daemon}.log"):
            path = node.paths.log_dir / name
            if not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if any(w in line for w in wanted) or " WARNING " in line or " ERROR " in line:
                    picked.append((daemon, line))
    return [f"{daemon}: {line}" for daemon, line in picked[-limit:]]
