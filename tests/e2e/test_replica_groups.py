"""A service with replica groups wants the groups' counts, and status says so."""

from __future__ import annotations

import pytest

from tests.e2e.node import IMAGE, Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


def test_a_service_with_replica_groups_wants_the_sum_of_their_counts(node: Node) -> None:
    spec = node.spec(
        "groups",
        f"""
        version: v1
        deployment: groups
        services:
          web:
            image: {IMAGE}
            command: {{entrypoint: ["sleep", "600"]}}
            stop_signal: SIGKILL
            replica_groups:
              - {{role: primary, count: 2}}
              - {{role: backup, count: 1}}
        """,
    )
    try:
        node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
        web = wait_until(
            lambda: (s := node.services("groups")["web"])["running"] == 3 and s,
            30,
            "three replicas running",
        )
        assert web["desired"] == 3 and web["state"] == "running", web
        assert len(node.replicas("groups")) == 3
        shown = node.ctl("ps", "-d", "groups", check=True).stdout
        assert "3/3" in shown, shown
        scaled = node.ctl("scale", "-d", "groups", "web", "5")
        assert scaled.returncode != 0 and scaled.stderr.strip() == (
            "error: web's replicas are set by its replica_groups (3 in all); change their "
            "counts in the spec and deploy it again"
        ), scaled.stderr
    finally:
        node.ctl("down", "groups")
