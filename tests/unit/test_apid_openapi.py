"""The OpenAPI document apid serves: made from the route table, so every route is in it
with its parameters, body, reply, problem replies and the bearer scheme, and each of its
schemas is valid JSON Schema."""

from __future__ import annotations

import json
import re

from jsonschema import Draft202012Validator

import daemons.apid.app  # noqa: F401  # every routes module declares its routes
from daemons.apid.openapi import PROBLEMS, document, openapi_path
from daemons.apid.routing import ROUTES


def test_every_route_is_documented_with_its_parameters_replies_and_security() -> None:
    doc = json.loads(document())
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert len(ROUTES) >= 30
    operation_ids = set()
    for spec in ROUTES:
        path = openapi_path(spec.full_path)
        assert "{" not in re.sub(r"\{\w+\}", "", path), path  # no aiohttp regex left
        operation = doc["paths"][path][spec.method.lower()]
        operation_ids.add(operation["operationId"])
        assert operation["security"] == [{"bearer": []}]
        assert str(spec.status) in operation["responses"]
        for status in PROBLEMS:
            assert status in operation["responses"], (path, status)
        in_path = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert in_path == set(re.findall(r"\{(\w+)\}", path)), path
        in_query = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
        assert in_query == set(spec.query), path
        assert ("requestBody" in operation) == (spec.body is not None), path
    assert len(operation_ids) == len(ROUTES)  # unique
    assert doc["paths"]["/health/live"]["get"]["security"] == []


def test_every_schema_in_the_document_is_valid_json_schema() -> None:
    doc = json.loads(document())
    for name, value in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(value)
        assert value.get("type") == "object" or "anyOf" in value or "enum" in value, name
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"title", "status", "detail"}


def test_route_only_problems_binary_build_body_and_required_deployment_query() -> None:
    paths = json.loads(document())["paths"]
    build = paths["/api/v1/build"]["post"]
    assert "415" in build["responses"]
    binary = {"type": "string", "format": "binary"}
    assert build["requestBody"]["content"] == {
        "application/x-tar": {"schema": binary},
        "application/gzip": {"schema": binary},
    }
    exec_ = paths["/api/v1/deployments/{dep}/services/{svc}/exec"]["post"]["responses"]
    assert {"422", "504"} <= set(exec_)
    for path in (
        "/api/v1/jobs/{svc}/trigger",
        "/api/v1/jobs/{svc}/executions",
        "/api/v1/cron/{svc}/trigger",
        "/api/v1/cron/{svc}/enable",
        "/api/v1/cron/{svc}/disable",
    ):
        for operation in paths[path].values():
            (deployment,) = [p for p in operation["parameters"] if p["name"] == "deployment"]
            assert deployment["required"] is True, path
    # where the deployment may be left out, it is not required
    (listing,) = [p for p in paths["/api/v1/cron"]["get"]["parameters"]]
    assert listing["required"] is False
