"""``/api/v1/tokens``: list, create and revoke the API's tokens (admin).

The same store as Api1's token members on the bus (``zlayerctl token``). A
token scoped to deployments reaches only tokens within its own scope: it
lists and revokes those alone, and makes only tokens scoped to some of its
deployments, so a scoped admin cannot mint itself a token for everything.
"""

from __future__ import annotations

from aiohttp import web

from daemons.apid.routing import Principal, Role, principal, route
from daemons.apid.tokens import TOKEN_STORE_KEY, TokenStore
from shared.bus import NotFoundError
from shared.wire import WireError, decode, encode
from shared.wire.api import TokenCreate, TokenInfo, TokenIssued

JSON = "application/json"


def _store(request: web.Request) -> TokenStore:
    return request.app[TOKEN_STORE_KEY]


def _within(caller: Principal, deployments: list[str]) -> bool:
    """Whether a token of ``deployments`` ([] = every one) lies inside the caller's scope."""
    if caller.deployments is None:
        return True
    return bool(deployments) and set(deployments) <= caller.deployments


@route(
    "GET",
    "/tokens",
    role=Role.ADMIN,
    summary="Every token (revoked ones too), never their text",
    returns=list[TokenInfo],
    tags=("tokens",),
)
async def list_tokens(request: web.Request) -> web.StreamResponse:
    caller = principal(request)
    tokens = [t for t in _store(request).list() if _within(caller, t.deployments)]
    return web.Response(text=encode(tokens), content_type=JSON)


@route(
    "POST",
    "/tokens",
    role=Role.ADMIN,
    summary="Make a token; the reply is the only time its text is shown",
    body=TokenCreate,
    returns=TokenIssued,
    status=201,
    tags=("tokens",),
)
async def create_token(request: web.Request) -> web.StreamResponse:
    try:
        wanted = decode(await request.read(), TokenCreate)
    except WireError as exc:
        raise web.HTTPBadRequest(text=f"the body is {exc}") from None
    caller = principal(request)
    if not _within(caller, wanted.deployments):
        scope = ", ".join(sorted(caller.deployments or ()))
        raise web.HTTPForbidden(
            text=f"the token {caller.name} may only make tokens scoped to some of: {scope}"
        )
    issued = await _store(request).create(wanted)
    return web.Response(text=encode(issued), status=201, content_type=JSON)


@route(
    "DELETE",
    "/tokens/{name}",
    role=Role.ADMIN,
    summary="Revoke a token at once (its next request is refused)",
    returns=TokenInfo,
    tags=("tokens",),
)
async def revoke_token(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    store = _store(request)
    caller = principal(request)
    known = {t.name: t for t in store.list()}
    if name not in known or not _within(caller, known[name].deployments):
        raise NotFoundError(f"there is no token named {name}")
    return web.Response(text=encode(await store.remove(name)), content_type=JSON)
