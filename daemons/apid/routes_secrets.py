"""Secrets: the bus calls ``zlayerctl secret set|ls|get|rm`` make.

Listing shows names, scopes and times to an operator, never a value; setting,
reading and removing one is an admin's. A token limited to deployments sees
and touches only their secrets: node-wide ones are outside its reach, as a
deployment outside it is (404, as if absent).
"""

from __future__ import annotations

from aiohttp import web

from daemons.apid.base import api, body_as, reply
from daemons.apid.problems import ApiProblem
from daemons.apid.routing import Role, can_see, principal, route
from shared.wire.api import SecretInfo, SecretValue, SecretWrite

TAGS = ("secrets",)
DEPLOYMENT_QUERY = {"deployment": "the deployment the secret belongs to (none: the node-wide one)"}


def _bus_text(what: str, text: str) -> None:
    """400 for text the bus cannot carry (a D-Bus string is UTF-8 without NUL)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiProblem(400, f"the {what} is not valid Unicode text") from None
    if "\0" in text:
        raise ApiProblem(400, f"the {what} holds a NUL character, which a secret cannot hold")


def _reachable(request: web.Request, name: str, deployment: str) -> None:
    """404 for a secret outside the caller's token, as if there were none."""
    _bus_text("secret's name", name)
    _bus_text("deployment's name", deployment)
    if deployment and can_see(request, deployment):
        return
    if not deployment and principal(request).deployments is None:
        return
    what = f"secret {name} of deployment {deployment}" if deployment else f"node-wide secret {name}"
    raise ApiProblem(404, f"there is no {what}; `zlayerctl secret ls` lists them")


@route(
    "GET",
    "/secrets",
    role=Role.OPERATOR,
    summary="List secrets: names, deployments and times, never a value (ListSecrets)",
    returns=list[SecretInfo],
    tags=TAGS,
)
async def list_secrets(request: web.Request) -> web.StreamResponse:
    found = await api(request).scheduler.list_secrets()
    scoped = principal(request).deployments is not None
    return reply(
        [s for s in found if (can_see(request, s.deployment) if s.deployment else not scoped)]
    )


@route(
    "POST",
    "/secrets",
    role=Role.ADMIN,
    summary="Set a secret; the services whose env reads it roll (SetSecret)",
    body=SecretWrite,
    returns=SecretInfo,
    tags=TAGS,
)
async def set_secret(request: web.Request) -> web.StreamResponse:
    wanted: SecretWrite = await body_as(request, SecretWrite)
    _bus_text("secret's value", wanted.value)
    _reachable(request, wanted.name, wanted.deployment)
    stored = await api(request).scheduler.set_secret(wanted.name, wanted.deployment, wanted.value)
    return reply(stored)


@route(
    "GET",
    "/secrets/{name}",
    role=Role.ADMIN,
    summary="A secret's value (GetSecret)",
    deployment="?deployment",
    returns=SecretValue,
    query=DEPLOYMENT_QUERY,
    tags=TAGS,
)
async def get_secret(request: web.Request) -> web.StreamResponse:
    name, deployment = request.match_info["name"], request.query.get("deployment", "")
    _reachable(request, name, deployment)
    return reply(await api(request).scheduler.get_secret(name, deployment))


@route(
    "DELETE",
    "/secrets/{name}",
    role=Role.ADMIN,
    summary="Remove a secret; the services that read it roll to the node-wide one (RemoveSecret)",
    deployment="?deployment",
    status=204,
    query=DEPLOYMENT_QUERY,
    tags=TAGS,
)
async def remove_secret(request: web.Request) -> web.StreamResponse:
    name, deployment = request.match_info["name"], request.query.get("deployment", "")
    _reachable(request, name, deployment)
    await api(request).scheduler.remove_secret(name, deployment)
    return web.Response(status=204)
