"""The REST API's secrets routes against the real daemons: set, list (never a value),
read back, remove, each error a problem document with the CLI's sentence and no value.

apid runs with ``auth = "none"`` (every caller the admin "local", on 127.0.0.1 only);
who may call which route is the auth tests' subject.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from shared.wire.api import TokenCreate
from tests.e2e.node import Node
from tests.integration.test_apid_routes import Api
from tests.integration.test_apid_scope import make_token

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

VALUE = "api-Secret-Value-5d1c0e"
SPEC = """\
version: v1
deployment: vault
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["exec sleep 3600"]
    env: {TOKEN: $S:token}
    scale: {mode: fixed, replicas: 1}
"""


@pytest.fixture(scope="module")
def node_api(open_api_node: tuple[Node, Api]) -> tuple[Node, Api]:
    return open_api_node


@pytest.fixture
def api(node_api: tuple[Node, Api]) -> Iterator[Api]:
    node, client = node_api
    yield client
    for deployment in client.json("GET", "/api/v1/deployments"):
        node.ctl("down", deployment["name"])
    for row in client.json("GET", "/api/v1/secrets"):
        client.call("DELETE", f"/api/v1/secrets/{row['name']}?deployment={row['deployment']}")


def test_secrets_through_the_api(api: Api) -> None:
    missing = api.problem(
        "POST", "/api/v1/deployments", 400, body=SPEC, headers={"Content-Type": "application/yaml"}
    )
    assert "secret token is not set" in missing["detail"]

    stored = api.json("POST", "/api/v1/secrets", {"name": "token", "value": VALUE})
    assert stored["name"] == "token" and stored["deployment"] == "" and stored["version"] == 1
    assert "value" not in stored
    again = api.json(
        "POST", "/api/v1/secrets", {"name": "token", "value": VALUE + "x", "deployment": "vault"}
    )
    assert again["deployment"] == "vault"

    status, _, raw = api.call("GET", "/api/v1/secrets")
    assert status == 200 and VALUE.encode() not in raw
    assert sorted((s["name"], s["deployment"]) for s in json.loads(raw)) == [
        ("token", ""),
        ("token", "vault"),
    ]
    assert api.json("GET", "/api/v1/secrets/token") == {
        "name": "token",
        "deployment": "",
        "value": VALUE,
    }
    assert api.json("GET", "/api/v1/secrets/token?deployment=vault")["value"] == VALUE + "x"

    status, _, _ = api.call(
        "POST", "/api/v1/deployments", SPEC, {"Content-Type": "application/yaml"}
    )
    assert status == 202
    # The deployment's own secret can go (the node-wide one takes over); the last one cannot.
    assert api.call("DELETE", "/api/v1/secrets/token?deployment=vault")[0] == 204
    refused = api.problem("DELETE", "/api/v1/secrets/token", 409)
    assert "secret token is used by deployment vault (web)" in refused["detail"]

    gone = api.problem("GET", "/api/v1/secrets/token?deployment=vault", 404)
    assert gone["detail"].startswith("there is no secret token of deployment vault")
    bad = api.problem(
        "POST",
        "/api/v1/secrets",
        400,
        body=json.dumps({"name": "../x", "value": VALUE}),
        headers={"Content-Type": "application/json"},
    )
    assert "is not a secret name" in bad["detail"]
    api.problem(
        "POST", "/api/v1/secrets", 400, body="{", headers={"Content-Type": "application/json"}
    )

    # What the bus cannot carry is a 400 with a sentence, not a 500.
    nul = api.problem(
        "POST",
        "/api/v1/secrets",
        400,
        body=json.dumps({"name": "n", "value": "a\u0000b"}),
        headers={"Content-Type": "application/json"},
    )
    assert "NUL character" in nul["detail"]
    api.problem("GET", "/api/v1/secrets/a%00b", 400)

    for path in ("/api/v1/deployments", "/api/v1/events?limit=500", "/api/v1/containers"):
        assert VALUE.encode() not in api.call("GET", path)[2]
    assert VALUE not in json.dumps([refused, gone, bad, missing])

    document = api.json("GET", "/api/v1/openapi.json")
    assert {"get", "post"} <= set(document["paths"]["/api/v1/secrets"])
    assert {"get", "delete"} <= set(document["paths"]["/api/v1/secrets/{name}"])


@pytest.fixture
def token_node(token_api_node: tuple[Node, Api]) -> tuple[Node, int]:
    """The daemons with apid checking bearer tokens (not the module's auth = "none")."""
    node, api = token_api_node
    return node, api.port


def test_a_token_limited_to_deployments_reaches_only_their_secrets(
    token_node: tuple[Node, int],
) -> None:
    node, port = token_node
    admin = Api(port, make_token(node, TokenCreate(name="secrets-root", role="admin")))
    for deployment in ("", "mine", "theirs"):
        admin.json(
            "POST", "/api/v1/secrets", {"name": "a", "value": VALUE, "deployment": deployment}
        )

    scoped = Api(port, make_token(node, TokenCreate(name="m", role="admin", deployments=["mine"])))
    assert [(s["name"], s["deployment"]) for s in scoped.json("GET", "/api/v1/secrets")] == [
        ("a", "mine")
    ]
    assert scoped.json("GET", "/api/v1/secrets/a?deployment=mine")["value"] == VALUE
    for method, path in (
        ("GET", "/api/v1/secrets/a?deployment=theirs"),
        ("GET", "/api/v1/secrets/a"),
        ("DELETE", "/api/v1/secrets/a?deployment=theirs"),
        ("DELETE", "/api/v1/secrets/a"),
    ):
        hidden = scoped.problem(method, path, 404)
        assert VALUE not in hidden["detail"]
    for deployment in ("", "theirs"):
        scoped.problem(
            "POST",
            "/api/v1/secrets",
            404,
            body=json.dumps({"name": "a", "value": "x", "deployment": deployment}),
            headers={"Content-Type": "application/json"},
        )
    assert admin.json("GET", "/api/v1/secrets/a?deployment=theirs")["value"] == VALUE

    operator = Api(port, make_token(node, TokenCreate(name="o", role="operator")))
    status, _, raw = operator.call("GET", "/api/v1/secrets")
    assert status == 200 and len(json.loads(raw)) == 3 and VALUE.encode() not in raw
    operator.problem("GET", "/api/v1/secrets/a", 403)
    operator.problem(
        "POST",
        "/api/v1/secrets",
        403,
        body=json.dumps({"name": "a", "value": "x"}),
        headers={"Content-Type": "application/json"},
    )
    for deployment in ("", "mine", "theirs"):
        admin.call("DELETE", f"/api/v1/secrets/a?deployment={deployment}")
