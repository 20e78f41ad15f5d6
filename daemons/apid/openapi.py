"""The OpenAPI 3.1 document of the REST API, generated from the route table, and its docs page.

Every route in ``routing.ROUTES`` becomes an operation: its path and query
parameters, its body and reply as the JSON Schema of their ``shared.wire``
types (``shared.wire.schema``), the problem documents it may answer, and the
bearer security scheme. The docs page is Swagger UI from the package's own
``docs_ui`` files: nothing is fetched from outside the node.
"""

from __future__ import annotations

import asyncio
import re
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from daemons.apid.problems import PROBLEM_JSON
from daemons.apid.routing import API_PREFIX, ROUTES, RouteSpec
from shared.wire import encode, schema
from shared.wire.api import Problem
from shared.wire.scheduler import DeployPlan

OPENAPI_PATH = API_PREFIX + "/openapi.json"
DOCS_PATH = API_PREFIX + "/docs"
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
_MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}

# the problems every route may answer, beside its own reply
PROBLEMS = {
    "400": "the request is not valid (body, query or spec)",
    "401": "no token, or not a valid one",
    "403": "the token's role is too low for this route",
    "404": "no such deployment, service, operation or node (or outside the token's scope)",
    "409": "it exists already or conflicts with what is running",
    "413": "the request body is too large",
    "429": "too many requests from this token; see Retry-After",
    "500": "apid failed; its journal says why",
    "501": "not supported on this node",
    "502": "a daemon answered what apid cannot read",
    "503": "a daemon is not running or did not answer",
}
# problems only some routes answer
ROUTE_PROBLEMS: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/build"): {"415": "the body is not a tar (application/x-tar, or gzip)"},
    ("POST", "/deployments/{dep}/services/{svc}/exec"): {
        "422": "the command wrote more than the output limit",
        "504": "the command did not end within ?timeout=",
    },
}
# how a route's query description marks a parameter it cannot do without
REQUIRED = "(required)"
# request bodies that are not a wire type's JSON: the bytes as sent
BINARY = {"type": "string", "format": "binary"}
# replies a route gives besides its main one
OTHER_REPLIES: dict[tuple[str, str], dict[int, Any]] = {
    ("POST", "/deployments"): {200: DeployPlan},  # ?dry_run=true
}
# query parameters whose values are not free text
QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "dry_run": {"type": "boolean"},
    "follow": {"type": "boolean"},
    "force": {"type": "boolean"},
    "limit": {"type": "integer", "minimum": 1, "maximum": 10_000},
    "tail": {"type": "integer", "minimum": 0},
    # a terminal's size (exec/ws): unsigned shorts
    "cols": {"type": "integer", "minimum": 1, "maximum": 65535},
    "rows": {"type": "integer", "minimum": 1, "maximum": 65535},
}
_PLACEHOLDER = re.compile(r"\{(\w+)(?::((?:[^{}]|\{[^{}]*\})*))?\}")


def openapi_path(path: str) -> str:
    """aiohttp's ``{id:[0-9]+}`` as OpenAPI's ``{id}``."""
    return _PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", path)


def _path_parameter(name: str, pattern: str | None) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern and re.fullmatch(r"\w+(\|\w+)+", pattern):
        value = {"type": "string", "enum": pattern.split("|")}
    elif pattern and pattern.startswith("[0-9]"):
        value = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    elif pattern is None:
        value["pattern"] = "^[^/]+$"
    return {"name": name, "in": "path", "required": True, "schema": value}


def _types() -> list[Any]:
    found: list[Any] = [Problem]
    for spec in ROUTES:
        for value in (
            None if spec.body is bytes else spec.body,  # sent as is: BINARY
            spec.returns,
            *OTHER_REPLIES.get((spec.method, spec.path), {}).values(),
        ):
            if value is not None and value not in found:
                found.append(value)
    return found


def _sse_event(data: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event, as OpenAPI 3.1 describes a stream (the schema of each event):
    its kind and its data, a JSON text of ``data``'s schema."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": data,
            },
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


def _item(schema: dict[str, Any]) -> dict[str, Any]:
    """What one event of a listing's stream carries: an item of the list."""
    items = schema.get("items")
    return items if schema.get("type") == "array" and isinstance(items, dict) else schema


def _content(media: str, value_schema: dict[str, Any]) -> dict[str, Any]:
    return {media: {"schema": value_schema}}


def _operation_id(spec: RouteSpec) -> str:
    words = re.sub(r"[^a-z0-9]+", "_", openapi_path(spec.path).lower()).strip("_")
    return f"{spec.method.lower()}_{words}"


def _operation(spec: RouteSpec, schemas: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    parameters = [_path_parameter(m.group(1), m.group(2)) for m in _PLACEHOLDER.finditer(spec.path)]
    for name, description in spec.query.items():
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": description.endswith(REQUIRED),
                "description": description,
                "schema": QUERY_SCHEMAS.get(name, {"type": "string"}),
            }
        )
    responses: dict[str, Any] = {}
    main: dict[str, Any] = {"description": spec.summary}
    if spec.returns is not None:
        returns = schemas[spec.returns]
        if spec.content == "text/event-stream":
            main["content"] = _content(spec.content, _sse_event(returns))
        elif spec.content == "application/json":
            main["content"] = _content(spec.content, returns)
        else:
            main["content"] = _content(spec.content, {"type": "string"})
    responses[str(spec.status)] = main
    if spec.content == "application/json" and spec.returns is not None and "follow" in spec.query:
        # the same route streams when asked to
        main["content"]["text/event-stream"] = {"schema": _sse_event(_item(returns))}
    for code, value in OTHER_REPLIES.get((spec.method, spec.path), {}).items():
        responses[str(code)] = {
            "description": value.__name__,
            "content": _content("application/json", schemas[value]),
        }
    problem = _content(PROBLEM_JSON, {"$ref": "#/components/schemas/Problem"})
    own = ROUTE_PROBLEMS.get((spec.method, spec.path), {})
    for status, description in sorted({**PROBLEMS, **own}.items()):
        responses.setdefault(status, {"description": description, "content": problem})
    operation: dict[str, Any] = {
        "operationId": _operation_id(spec),
        "summary": spec.summary,
        "description": f"Needs the {spec.role.label} role.",
        "tags": list(spec.tags),
        "parameters": parameters,
        "responses": responses,
        "security": [{"bearer": []}],
    }
    if spec.body is not None:
        content: dict[str, Any] = {}
        for media in spec.body_content.split("|"):
            if media == "application/json":
                content[media] = {"schema": schemas[spec.body]}
            elif spec.body is bytes:
                content[media] = {"schema": BINARY}
            else:
                content[media] = {"schema": {"type": "string"}}
        operation["requestBody"] = {"required": True, "content": content}
    return operation


@cache
def document() -> bytes:
    """The document as JSON, made once (the route table is complete once apid serves)."""
    types = _types()
    by_name, components = schema(*types)
    schemas = {t: s for t, s in zip(types, by_name.values(), strict=True)}
    paths: dict[str, dict[str, Any]] = {}
    for spec in ROUTES:
        paths.setdefault(openapi_path(spec.full_path), {})[spec.method.lower()] = _operation(
            spec, schemas
        )
    paths["/health/live"] = {
        "get": {
            "operationId": "health_live",
            "summary": "The process serves HTTP",
            "tags": ["health"],
            "security": [],
            "responses": {"200": {"description": "live"}},
        }
    }
    paths["/health/ready"] = {
        "get": {
            "operationId": "health_ready",
            "summary": "Every daemon answers over the bus",
            "tags": ["health"],
            "security": [],
            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
        }
    }
    from shared import __version__

    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "ZLayer node API",
            "version": __version__,
            "description": "Every route calls the bus method zlayerctl uses for the same "
            "command and answers with the same values; errors are RFC 9457 problem documents "
            "carrying the CLI's sentence. A long operation answers 202 with the operation to "
            "follow at /api/v1/operations/{daemon}/{id}.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
    return encode(doc).encode()


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ZLayer node API</title>
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
<link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
</script>
</body>
</html>
"""


async def _document(_request: web.Request) -> web.Response:
    return web.Response(body=document(), content_type="application/json")


async def _docs(_request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


@cache
def _asset(name: str) -> bytes:
    return resources.files("daemons.apid").joinpath("docs_ui", name).read_bytes()


async def _docs_file(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in DOCS_FILES:
        raise web.HTTPNotFound()
    suffix = name[name.rfind(".") :]
    body = await asyncio.to_thread(_asset, name)  # the first read is from disk
    return web.Response(
        body=body,
        content_type=_MEDIA[suffix],
        headers={"Cache-Control": "public, max-age=86400"},
    )


def add_document_routes(app: web.Application) -> None:
    """The document and the docs page: public, outside the route table (they describe)."""
    app.router.add_get(OPENAPI_PATH, _document)
    app.router.add_get(DOCS_PATH, _docs)
    app.router.add_get(DOCS_PATH + "/{file}", _docs_file)
