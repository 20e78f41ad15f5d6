"""schedd's traffic view in a cluster: which replicas a node offers proxyd and
overlayd while a replica moves between nodes (drain, failover, rebalancing)."""

from __future__ import annotations

from daemons.schedd.store import ServiceState
from daemons.schedd.views import deployment_traffic
from shared.spec import parse_spec
from shared.wire.agent import ReplicaInfo, ServiceAssignment

SPEC = parse_spec(
    """
version: v1
deployment: app
services:
  web:
    image: web:1
    endpoints:
      - name: http
        protocol: http
        port: 8080
"""
)


def replica(node: str, address: str) -> ReplicaInfo:
    # The id is the same on every node: deployment, service, instance, revision.
    return ReplicaInfo(
        id="app-web-1-r1",
        deployment="app",
        service="web",
        instance=1,
        revision=1,
        image="web:1",
        state="running",
        health="healthy",
        address=address,
        node=node,
    )


def backends(desired_here: list[int]) -> list[str]:
    local = replica("", "10.90.1.5")
    moved = replica("n2", "10.90.2.7")
    assignment = ServiceAssignment(
        deployment="app",
        service="web",
        revision=1,
        spec={},
        replicas=1,
        instances=desired_here,
    )
    view = deployment_traffic(
        "app",
        SPEC,
        {"web": ServiceState(serving=1, target=1)},
        [local, moved],
        {},
        {("app", "web"): assignment} if desired_here else {},
        {(moved.node, moved.id)},
    )
    (service,) = view.services
    return sorted(b.address for b in service.backends)


def test_a_replica_moved_off_this_node_leaves_its_rotation_while_its_new_copy_serves() -> None:
    # Instance 1 now placed on n2: this node's copy (same id) leaves rotation first.
    assert backends([]) == ["10.90.2.7"]


def test_a_replica_still_placed_here_serves_beside_the_other_nodes() -> None:
    assert backends([1]) == ["10.90.1.5", "10.90.2.7"]
