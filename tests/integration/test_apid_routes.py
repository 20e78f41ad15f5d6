"""The REST API's core routes against the real six daemons: deployments, services,
containers, events, nodes, daemons, network views and operations, each answering what
the bus answers, and every error a problem document with the CLI's sentence.

apid runs with ``auth = "none"`` (every caller the admin "local", on 127.0.0.1
only): who may call what is the auth tests' subject.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.node import Node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

REST_API = re.compile(r"REST API on (\S+):(\d+)")
SPEC = """\
version: v1
deployment: {name}
services:
  web:
    image: zlayer/busybox:latest
    command:
      entrypoint: ["sh", "-c"]
      args: ["exec sleep 3600"]
    scale: {{mode: fixed, replicas: {replicas}}}
"""


class Api:
    """A plain HTTP client of one apid."""

    def __init__(self, port: int, token: str = "") -> None:
        self.port = port
        self.token = token  # "" under auth = "none"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def call(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = body.encode() if isinstance(body, str) else body
            sent = {**self.auth_headers(), **(headers or {})}
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        sent = None if body is None else json.dumps(body)
        got, _, data = self.call(
            method, path, sent, {"Content-Type": "application/json"} if sent else {}
        )
        assert got == status, (got, data)
        return json.loads(data) if data else None

    def problem(self, method: str, path: str, status: int, **kwargs: Any) -> dict[str, Any]:
        got, headers, data = self.call(method, path, **kwargs)
        assert got == status, (got, data)
        assert headers["Content-Type"].startswith("application/problem+json"), headers
        document: dict[str, Any] = json.loads(data)
        assert document["status"] == status and document["title"] and document["type"]
        assert "Traceback" not in document["detail"] and "\n" not in document["detail"]
        return document


def apid_port(node: Node) -> int:
    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(node.ctl("status", "--format", "json").stdout or "[]")
        for row in rows:
            found = REST_API.search(row.get("detail", "")) if row["name"] == "apid" else None
            if found:
                return int(found.group(2))
        assert time.monotonic() < deadline, "zlayer-apid did not say its port within 30 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def node_api(open_api_node: tuple[Node, Api]) -> tuple[Node, Api]:
    """The six daemons under zlayerctl, apid serving every caller as the admin "local"
    (the node test_api_secrets uses too: see the integration tests' conftest)."""
    return open_api_node


@pytest.fixture
def api(node_api: tuple[Node, Api]) -> Iterator[Api]:
    """The API; whatever a test left deployed goes before the leak check."""
    node, client = node_api
    yield client
    for deployment in client.json("GET", "/api/v1/deployments"):
        node.ctl("down", deployment["name"])


def sse_events(response: http.client.HTTPResponse, wanted: int) -> list[tuple[str, Any]]:
    """The first ``wanted`` events of a stream: (event kind, decoded data)."""
    found: list[tuple[str, Any]] = []
    kind = ""
    while len(found) < wanted:
        line = response.readline()
        assert line, f"the stream ended after {found}"
        text = line.decode().rstrip("\n")
        if text.startswith("event: "):
            kind = text[len("event: ") :]
        elif text.startswith("data: "):
            found.append((kind, json.loads(text[len("data: ") :])))
    return found


def follow(api: Api, location: str) -> list[tuple[str, Any]]:
    """Every event of an operation's stream until its final JobInfo."""
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=120)
    try:
        connection.request("GET", location + "/stream", headers=api.auth_headers())
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        events: list[tuple[str, Any]] = []
        while not events or events[-1][1]["state"] == "running":
            events += sse_events(response, 1)
        return events
    finally:
        connection.close()


def test_a_deployment_through_the_api_from_deploy_to_down(api: Api) -> None:
    name = "apicore"
    plan = api.json(
        "POST", "/api/v1/deployments?dry_run=true", {"spec": SPEC.format(name=name, replicas=2)}
    )
    assert plan["deployment"] == name and plan["actions"]
    assert api.json("GET", "/api/v1/deployments") == []

    # the deployment's event stream, open before the deploy
    watcher = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    watcher.request(
        "GET", f"/api/v1/deployments/{name}/events", headers={"Accept": "text/event-stream"}
    )
    watched = watcher.getresponse()
    assert watched.status == 200

    status, headers, data = api.call(
        "POST",
        "/api/v1/deployments?filename=web.yml",
        SPEC.format(name=name, replicas=2),
        {"Content-Type": "application/yaml"},
    )
    assert status == 202, data
    deployed = json.loads(data)
    location = headers["Location"]
    assert location == f"/api/v1/operations/scheduler/{deployed['job']}"
    assert deployed["status"]["name"] == name
    events = follow(api, location)
    assert events[-1][0] == "done" and events[-1][1]["state"] == "done", events[-1]
    assert api.json("GET", location)["state"] == "done"

    kind, event = sse_events(watched, 1)[0]
    assert event["deployment"] == name and kind == event["kind"]
    watcher.close()

    listed = api.json("GET", "/api/v1/deployments")
    assert [d["name"] for d in listed] == [name]
    got = api.json("GET", f"/api/v1/deployments/{name}")
    assert got["state"] == "running" and got["services"][0]["running"] == 2
    services = api.json("GET", f"/api/v1/deployments/{name}/services")
    assert [s["name"] for s in services] == ["web"]
    assert api.json("GET", f"/api/v1/deployments/{name}/services/web")["desired"] == 2
    replicas = api.json("GET", f"/api/v1/deployments/{name}/services/web/containers")
    assert len(replicas) == 2 and {r["service"] for r in replicas} == {"web"}
    every = api.json("GET", "/api/v1/containers")
    assert {r["id"] for r in replicas} <= {r["id"] for r in every}
    listed_events = api.json("GET", f"/api/v1/deployments/{name}/events?limit=5")
    assert 0 < len(listed_events) <= 5 and all(e["deployment"] == name for e in listed_events)
    assert api.json("GET", "/api/v1/events?limit=3")[-1]["deployment"] == name
    # the stored spec comes back as it was sent
    status, headers, data = api.call("GET", f"/api/v1/deployments/{name}/spec")
    assert status == 200 and headers["Content-Type"].startswith("application/yaml")
    assert data.decode() == SPEC.format(name=name, replicas=2)

    scaled = api.json(
        "POST", f"/api/v1/deployments/{name}/services/web/scale", {"replicas": 1}, status=202
    )
    assert scaled["daemon"] == "scheduler"
    assert follow(api, f"/api/v1/operations/scheduler/{scaled['id']}")[-1][1]["state"] == "done"
    assert len(api.json("GET", f"/api/v1/deployments/{name}/services/web/containers")) == 1

    removed = api.json("DELETE", f"/api/v1/deployments/{name}", status=202)
    assert follow(api, f"/api/v1/operations/scheduler/{removed['id']}")[-1][1]["state"] == "done"
    assert api.json("GET", "/api/v1/deployments") == []
    api.problem("GET", f"/api/v1/deployments/{name}", 404)


def test_rollback_answers_the_revision_it_stored(api: Api) -> None:
    """Rollback starts no operation: it answers the new revision, and no Location to follow."""
    name = "rollme"
    for replicas in (1, 2):
        deployed = api.json(
            "POST", "/api/v1/deployments", {"spec": SPEC.format(name=name, replicas=replicas)}, 202
        )
        location = f"/api/v1/operations/scheduler/{deployed['job']}"
        assert follow(api, location)[-1][1]["state"] == "done"
    before = api.json("GET", f"/api/v1/deployments/{name}")["revision"]
    # a NUL would cut the name on the bus, acting on this deployment: refused before that
    cut = api.problem("POST", f"/api/v1/deployments/{name}%00x/rollback", 400)
    assert "NUL character" in cut["detail"]
    api.problem("GET", f"/api/v1/deployments/{name}/services/web/containers?replica=%00", 400)
    assert api.json("GET", f"/api/v1/deployments/{name}")["revision"] == before

    status, headers, data = api.call("POST", f"/api/v1/deployments/{name}/rollback")
    assert status == 200, data
    assert "Location" not in headers
    assert json.loads(data) == {"deployment": name, "revision": before + 1}
    got = api.json("GET", f"/api/v1/deployments/{name}")
    assert got["revision"] == before + 1
    assert api.call("GET", f"/api/v1/deployments/{name}/spec")[2].decode() == SPEC.format(
        name=name, replicas=1
    )
    missing = api.problem("POST", "/api/v1/deployments/nosuch/rollback", 404)
    assert "nosuch" in missing["detail"]


def test_errors_are_problem_documents_with_the_cli_sentence(api: Api) -> None:
    missing = api.problem("GET", "/api/v1/deployments/nosuch", 404)
    assert "nosuch" in missing["detail"]
    api.problem("GET", "/api/v1/deployments/nosuch/services/web", 404)
    api.problem("GET", "/api/v1/deployments/nosuch/spec", 404)
    api.problem("DELETE", "/api/v1/deployments/nosuch", 404)
    api.problem("GET", "/api/v1/operations/scheduler/999999", 404)
    api.problem("GET", "/api/v1/operations/nowhere/1", 404)  # no such route: aiohttp's 404
    # a job id the bus cannot carry (unsigned 64 bits) is no route, not an overflow's 500
    for job in ("99999999999999999999", "-1", "1e3"):
        api.problem("GET", f"/api/v1/operations/scheduler/{job}", 404)
        api.problem("GET", f"/api/v1/build/{job}", 404)
        api.problem("GET", f"/api/v1/build/{job}/logs", 404)
    api.problem("GET", "/api/v1/no/such/route", 404)
    wrong_method = api.problem("PUT", "/api/v1/deployments", 405)
    assert "PUT" in wrong_method["detail"]
    bad_json = api.problem(
        "POST", "/api/v1/deployments", 400, body="{", headers={"Content-Type": "application/json"}
    )
    assert "DeployRequest" in bad_json["detail"]
    bad_spec = api.problem(
        "POST",
        "/api/v1/deployments",
        400,
        body="version: v1\ndeployment: x\nservices: {web: {image: 3}}\n",
        headers={"Content-Type": "application/yaml"},
    )
    assert bad_spec["type"].startswith("urn:zlayer:error:")
    api.problem("GET", "/api/v1/deployments/x/events?limit=abc", 400)
    too_big = api.problem(
        "POST",
        "/api/v1/deployments",
        413,
        body=b"x" * (17 * 1024 * 1024),
        headers={"Content-Type": "application/yaml"},
    )
    assert "larger" in too_big["detail"]


def test_node_daemons_and_network_views(api: Api) -> None:
    daemons = api.json("GET", "/api/v1/daemons")
    assert sorted(d["name"] for d in daemons) == sorted(
        ["schedd", "agentd", "registryd", "overlayd", "proxyd", "apid"]
    )
    nodes = api.json("GET", "/api/v1/nodes")
    assert len(nodes) == 1 and nodes[0]["state"] == "ready"
    assert api.json("GET", f"/api/v1/nodes/{nodes[0]['name']}") == nodes[0]
    api.problem("GET", "/api/v1/nodes/elsewhere", 404)
    network = api.json("GET", "/api/v1/overlay/status")
    assert network["subnet"] and network["bridge"]
    assert isinstance(api.json("GET", "/api/v1/overlay/dns"), list)
    assert isinstance(api.json("GET", "/api/v1/proxy/routes"), list)
    assert isinstance(api.json("GET", "/api/v1/proxy/stats"), list)


def test_openapi_document_and_docs_page_need_no_network(api: Api) -> None:
    document = api.json("GET", "/api/v1/openapi.json")
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert "/api/v1/deployments/{name}" in paths
    assert "/api/v1/operations/{daemon}/{id}/stream" in paths
    # rollback answers its revision, no operation
    rollback = paths["/api/v1/deployments/{name}/rollback"]["post"]["responses"]
    assert "200" in rollback and "202" not in rollback
    # a build's id is a number, as an operation's (no string the bus cannot carry)
    build = paths["/api/v1/build/{id}"]["get"]["parameters"]
    assert [p["schema"]["type"] for p in build if p["name"] == "id"] == ["integer"]
    # the terminal's size of exec/ws
    ws = paths["/api/v1/deployments/{dep}/services/{svc}/exec/ws"]["get"]["parameters"]
    sizes = {p["name"]: p["schema"] for p in ws if p["name"] in ("cols", "rows")}
    assert sizes == {n: {"type": "integer", "minimum": 1, "maximum": 65535} for n in sizes}
    assert len(sizes) == 2
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    status, headers, page = api.call("GET", "/api/v1/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"http://" not in page and b"https://" not in page  # nothing from outside
    for asset in re.findall(rb'(?:src|href)="([^"]+)"', page):
        got, _, body = api.call("GET", "/api/v1/" + asset.decode())
        assert got == 200 and body, asset
