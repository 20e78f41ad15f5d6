"""A token scoped to deployments, against the real daemons: listings show only its
deployments, another deployment's operations and a deploy of another deployment answer
404 as if they did not exist. (Roles on every route are the auth tests' subject.)"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest

from shared.bus import open_bus, resolve_bus_address
from shared.clients import ApiClient
from shared.wire.api import TokenCreate
from tests.e2e.node import Node
from tests.integration.test_apid_routes import SPEC, Api, follow

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")


def make_token(node: Node, request: TokenCreate) -> str:
    async def create() -> str:
        bus = open_bus(resolve_bus_address(node.paths))
        try:
            return (await ApiClient(bus).create_token(request)).token
        finally:
            bus.close()

    return asyncio.run(create())


@pytest.fixture
def scoped_node(token_api_node: tuple[Node, Api]) -> Iterator[tuple[Node, int]]:
    node, api = token_api_node
    yield node, api.port
    for deployment in json.loads(node.ctl("ps", "--format", "json").stdout or "[]"):
        node.ctl("down", deployment["name"])


def test_a_scoped_token_sees_and_touches_only_its_deployments(
    scoped_node: tuple[Node, int],
) -> None:
    node, port = scoped_node
    admin = Api(port, make_token(node, TokenCreate(name="root", role="admin")))
    jobs = {}
    for name in ("mine", "theirs"):
        spec = {"spec": SPEC.format(name=name, replicas=0)}
        deployed = admin.json("POST", "/api/v1/deployments", spec, 202)
        jobs[name] = f"/api/v1/operations/scheduler/{deployed['job']}"
        assert follow(admin, jobs[name])[-1][0] == "done"

    scoped = Api(
        port,
        make_token(node, TokenCreate(name="ops", role="operator", deployments=["mine"])),
    )
    assert [d["name"] for d in scoped.json("GET", "/api/v1/deployments")] == ["mine"]
    assert {e["deployment"] for e in scoped.json("GET", "/api/v1/events?limit=50")} == {"mine"}
    assert scoped.json("GET", jobs["mine"])["target"] == "mine"
    hidden = scoped.problem("GET", jobs["theirs"], 404)
    assert hidden["detail"].startswith("job ")
    scoped.problem("GET", jobs["theirs"] + "/stream", 404)
    scoped.problem("POST", jobs["theirs"] + "/cancel", 404)
    scoped.problem("GET", "/api/v1/deployments/theirs", 404)
    refused = scoped.problem(
        "POST",
        "/api/v1/deployments",
        404,
        body=json.dumps({"spec": SPEC.format(name="theirs", replicas=1)}),
        headers={"Content-Type": "application/json"},
    )
    assert "theirs" in refused["detail"]
    # nothing changed for the deployment it may not reach
    assert admin.json("GET", "/api/v1/deployments/theirs")["services"][0]["desired"] == 0
    # and it still deploys its own
    again = scoped.json(
        "POST", "/api/v1/deployments", {"spec": SPEC.format(name="mine", replicas=0)}, 202
    )
    assert again["status"]["name"] == "mine"
