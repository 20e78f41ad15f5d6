"""A node's life in a cluster, on three nodes that start lone (SQLite, no etcd):
``node init`` on the first (its state moves into an etcd member it starts),
``node join`` on the others with a token (etcd voters, as the cluster has fewer
than three members), then ``node ls``, ``node label`` and ``node drain`` as
every node sees them, and the one sentence a bad token gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ctl.supervisor import find_executable
from tests.cluster.harness import Cluster, Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SETTLE = 20.0  # seconds for a change to reach every node's view (a watch, a lease)


@pytest.fixture(scope="module")
def lone() -> Iterator[Cluster]:
    """Three lone nodes: the test makes them a cluster."""
    with Cluster(3, etcd=False) as started:
        yield started
    left = started.leftovers()
    assert not left, f"the cluster left these behind: {left}"


def nodes_seen(node: Node) -> dict[str, Any]:
    done = node.run("node", "ls", "--format", "json", check=True)
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def until(node: Node, check: Any, what: str) -> dict[str, Any]:
    """``node ls`` on ``node`` until ``check(listing)`` holds (SETTLE seconds at most)."""
    deadline = time.monotonic() + SETTLE
    while True:
        seen = nodes_seen(node)
        if check(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: {what} not seen within {SETTLE:g} s: {seen}")
        time.sleep(0.3)


def one_sentence(text: str) -> None:
    line = text.strip().removeprefix("error:").strip()
    assert line and "\n" not in line and "Traceback" not in text, text


@pytest.fixture(scope="module")
def initialised(lone: Cluster) -> float:
    """``node init`` on n1; how long it took."""
    n1 = lone[0]
    # state of the lone node, to be moved into etcd: a secret (no image needed)
    n1.sh(
        "sh", "-c", f"printf s3cret | {find_executable('zlayerctl')} secret set moved", check=True
    )
    began = time.monotonic()
    n1.run("node", "init", "--advertise", str(n1.lan.ip), check=True)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def formed(lone: Cluster, initialised: float) -> dict[str, str]:
    """n2 and n3 joined with one token: node name -> node id."""
    n1, n2, n3 = lone
    token = n1.run("node", "join-token", "--ttl", "10m", check=True).stdout.strip()
    for node in (n2, n3):
        began = time.monotonic()
        node.run("node", "join", token, "--advertise", str(node.lan.ip), check=True)
        print(f"{node.name} joined in {time.monotonic() - began:.1f} s")
    print(f"n1's init took {initialised:.1f} s")
    return {node.name: nodes_seen(node)["this_node"] for node in lone}


def test_bad_tokens_are_one_sentence(lone: Cluster, initialised: float) -> None:
    """Before n2 joins: a damaged, an expired and a forged token are each refused with
    one sentence, and n2 stays lone."""
    from shared.cluster.jointoken import JoinToken, parse

    n1, n2 = lone[0], lone[1]
    expired = n1.run("node", "join-token", "--ttl", "1s", check=True).stdout.strip()
    real = parse(n1.run("node", "join-token", check=True).stdout.strip())
    # this cluster's address and CA, a secret it never stored
    forged = JoinToken(
        address=real.address,
        port=real.port,
        secret="A" * 43,
        ca_sha256=real.ca_sha256,
        expires_at=real.expires_at,
    ).text()
    time.sleep(1.5)
    for token, words in (
        ("not-a-token", "not a join token"),
        (expired, "expired"),
        (forged, "not one this cluster made"),
    ):
        done = n2.run("node", "join", token, "--advertise", str(n2.lan.ip))
        assert done.returncode == 1, done.stdout
        one_sentence(done.stderr)
        assert words in done.stderr, done.stderr
    done = n2.run("node", "ls")
    assert done.returncode == 1 and "not in a cluster" in done.stderr, done.stderr


def test_three_ready_nodes_and_one_leader_on_each(lone: Cluster, formed: dict[str, str]) -> None:
    for node in lone:
        seen = until(
            node,
            lambda s: len(s["nodes"]) == 3 and s["leader"] in {n["id"] for n in s["nodes"]},
            "three nodes and a leader",
        )
        assert {n["id"] for n in seen["nodes"]} == set(formed.values())
        assert all(n["state"] == "ready" for n in seen["nodes"])
        assert all(n["etcd_member"] for n in seen["nodes"]), "fewer than 3 members: each votes"
        by_id = {n["id"]: n for n in seen["nodes"]}
        for other in lone:
            assert by_id[formed[other.name]]["address"] == str(other.lan.ip)
            assert by_id[formed[other.name]]["name"] == other.name
        assert seen["this_node"] == formed[node.name]
    leaders = {nodes_seen(node)["leader"] for node in lone}
    assert len(leaders) == 1, leaders
    table = lone[1].run("node", "ls", check=True).stdout
    assert "leader" in table and table.count("voter") == 3, table


def test_the_first_nodes_state_moved_into_the_cluster(
    lone: Cluster, formed: dict[str, str]
) -> None:
    """n1's secret, set while it was lone, is in etcd: every node lists it."""
    for node in lone:
        listed = json.loads(node.run("secret", "ls", "--format", "json", check=True).stdout)
        assert [s["name"] for s in listed] == ["moved"], (node.name, listed)
    assert lone[0].run("secret", "get", "moved", check=True).stdout == "s3cret"
    # node init made the cluster's secrets key; each join handed it over
    keys = {(node.paths.state_dir / "cluster" / "secrets.key").read_bytes() for node in lone}
    assert len(keys) == 1 and len(keys.pop()) == 32


def test_secrets_open_on_every_node(lone: Cluster, formed: dict[str, str]) -> None:
    """Sealed with the cluster's key: n1's secret from before init (sealed again at init)
    opens on n2, and one n2 sets opens on n3."""
    n1, n2, n3 = lone
    assert n2.run("secret", "get", "moved", check=True).stdout == "s3cret"
    zlayerctl = find_executable("zlayerctl")
    n2.sh("sh", "-c", f"printf 'from n2' | {zlayerctl} secret set shared-key", check=True)
    try:
        assert n3.run("secret", "get", "shared-key", check=True).stdout == "from n2"
        assert n1.run("secret", "get", "shared-key", check=True).stdout == "from n2"
    finally:
        n2.run("secret", "rm", "shared-key", check=True)


def test_label_and_drain_show_on_every_node(lone: Cluster, formed: dict[str, str]) -> None:
    n1, _, n3 = lone
    target = formed["n2"]
    n1.run("node", "label", target, "zone=a", "disk=ssd", check=True)
    n3.run("node", "label", target, "disk-", check=True)
    n3.run("node", "drain", target, check=True)

    def changed(seen: dict[str, Any]) -> bool:
        record = {n["id"]: n for n in seen["nodes"]}.get(target)
        return bool(record) and record["labels"] == {"zone": "a"} and record["state"] == "draining"

    for node in lone:
        until(node, changed, "n2 labelled zone=a and draining")
    table = n1.run("node", "ls", check=True).stdout
    row = next(line for line in table.splitlines() if line.startswith(target))
    assert "draining" in row and "zone=a" in row, table
    others = [n for n in nodes_seen(n1)["nodes"] if n["id"] != target]
    assert all(n["state"] == "ready" and n["labels"] == {} for n in others)


def test_a_restarted_node_comes_back_as_itself(lone: Cluster, formed: dict[str, str]) -> None:
    """n2 killed outright and booted again: its supervisor starts its etcd member before
    schedd, which takes its place again under the same id, labels and drain kept."""
    n2 = lone[1]
    began = time.monotonic()
    n2.restart()
    print(f"n2 restarted in {time.monotonic() - began:.1f} s")
    state = n2.run("status", check=True)
    assert state.returncode == 0

    def back(seen: dict[str, Any]) -> bool:
        record = {n["id"]: n for n in seen["nodes"]}.get(formed["n2"])
        return (
            len(seen["nodes"]) == 3
            and bool(record)
            and record["state"] == "draining"
            and record["labels"] == {"zone": "a"}
        )

    for node in lone:
        until(node, back, "n2 back, draining, zone=a")
    assert nodes_seen(n2)["this_node"] == formed["n2"]


def test_unknown_node_is_one_sentence(lone: Cluster, formed: dict[str, str]) -> None:
    done = lone[0].run("node", "drain", "no-such-node")
    assert done.returncode == 1
    one_sentence(done.stderr)
    assert "no node no-such-node" in done.stderr


def test_rm_takes_a_node_and_its_etcd_member_out(lone: Cluster, formed: dict[str, str]) -> None:
    """Last (it shrinks the cluster): n3 removed from n1 is gone from every node's list
    and from etcd's members, stops its own member and is lone again, so it can join
    once more; removing oneself is refused."""
    n1, n2, n3 = lone
    done = n1.run("node", "rm", formed["n1"])
    assert done.returncode == 1 and "another node" in done.stderr, done.stderr
    one_sentence(done.stderr)
    n1.run("node", "rm", formed["n3"], check=True)
    try:
        for node in (n1, n2):
            until(
                node,
                lambda s: {n["id"] for n in s["nodes"]} == {formed["n1"], formed["n2"]},
                "n3 gone",
            )
    except AssertionError:
        print((n3.paths.log_dir / "schedd.log").read_text()[-6000:])
        raise
    files = n1.paths.state_dir / "cluster"
    listed = subprocess.run(
        [
            "etcdctl",
            f"--endpoints=https://{n1.lan.ip}:2379",
            f"--cacert={files / 'ca.crt'}",
            f"--cert={files / 'node.crt'}",
            f"--key={files / 'node.key'}",
            "member",
            "list",
            "-w",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    members = {m.get("name", "") for m in json.loads(listed.stdout)["members"]}
    assert members == {formed["n1"], formed["n2"]}, members
    from shared.cluster.config import load

    deadline = time.monotonic() + SETTLE
    while load(n3.paths) is not None or etcd_running(n3):
        assert time.monotonic() < deadline, "n3 kept its cluster.toml or its etcd member"
        time.sleep(0.3)
    # lone again, without a restart: it can join once more (as a voter: two members now)
    deadline = time.monotonic() + SETTLE
    while "not in a cluster" not in (done := n3.run("node", "ls")).stderr:
        schedd = (n3.paths.log_dir / "schedd.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"n3 is not lone again: {done.stdout}\n{schedd}"
        time.sleep(0.3)
    token = n1.run("node", "join-token", "--ttl", "10m", check=True).stdout.strip()
    n3.run("node", "join", token, "--advertise", str(n3.lan.ip), check=True)
    again = nodes_seen(n3)["this_node"]
    assert again != formed["n3"]
    for node in lone:
        seen = until(node, lambda s: len(s["nodes"]) == 3, "n3 back under a new id")
        assert again in {n["id"] for n in seen["nodes"]}
        assert all(n["etcd_member"] for n in seen["nodes"])


def etcd_running(node: Node) -> bool:
    from ctl.supervisor_state import SupervisorState

    state = SupervisorState.read(node.paths)
    return state is not None and "etcd" in state.daemons
