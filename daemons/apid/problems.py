"""Every error of the REST API as an RFC 9457 problem document, with the CLI's sentence.

Handlers raise: :class:`ApiProblem` for what the API itself refuses, the
``shared.bus`` errors as the daemons raise them, sdbus's errors when a daemon
is not on the bus, aiohttp's own ``HTTPException`` (404, 405, 413). The
middleware here turns each into ``application/problem+json``; anything else is
logged with its stack and answered 500 with one sentence, never a traceback.

Bus errors map: NotFound -> 404; InvalidSpec and InvalidArgument -> 400 (a
spec that parses but is invalid is also 400: the CLI does not tell the two
apart either); AlreadyExists and Conflict -> 409; Unavailable, a daemon not
on the bus or not answering -> 503; NotSupported -> 501.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web

from daemons.apid.routing import Handler
from shared.wire import WireError, encode
from shared.wire.api import Problem

PROBLEM_JSON = "application/problem+json"
ZLAYER_TYPE = "urn:zlayer:error:"

log = logging.getLogger("zlayer.apid")


class ApiProblem(Exception):
    """A request the API refuses: its status and the sentence for the caller."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type: str = "about:blank",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type
        self.headers = dict(headers or {})


def problem_response(
    status: int,
    detail: str,
    *,
    type: str = "about:blank",
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The problem document for ``status`` with ``detail``, the one sentence the CLI prints."""
    body = Problem(type=type, title=_title(status), status=status, detail=detail)
    return web.Response(
        text=encode(body), status=status, headers=headers, content_type=PROBLEM_JSON
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _bus_status() -> list[tuple[type[BaseException], int]]:
    from shared import bus

    return [
        (bus.NotFoundError, 404),
        (bus.InvalidSpecError, 400),
        (bus.InvalidArgumentError, 400),
        (bus.AlreadyExistsError, 409),
        (bus.ConflictError, 409),
        (bus.UnavailableError, 503),
        (bus.NotSupportedError, 501),
    ]


_BUS_STATUS = _bus_status()


def problem_for(exc: BaseException) -> web.Response | None:
    """The problem document for an error a handler raised; None for an unexpected one."""
    if isinstance(exc, ApiProblem):
        return problem_response(exc.status, exc.detail, type=exc.type, headers=exc.headers)
    for kind, status in _BUS_STATUS:
        if isinstance(exc, kind):
            detail = str(exc.args[0]) if exc.args else kind.__name__
            return problem_response(status, detail, type=ZLAYER_TYPE + kind.__name__)
    import sdbus

    from ctl.errors import explain

    if isinstance(
        exc,
        sdbus.DbusServiceUnknownError
        | sdbus.DbusNameHasNoOwnerError
        | sdbus.DbusNoReplyError
        | sdbus.DbusTimeoutError
        | sdbus.SdBusLibraryError,
    ):
        return problem_response(503, explain(exc))
    if isinstance(exc, WireError):
        # a reply the daemon's version does not share with ours
        return problem_response(502, f"a ZLayer daemon answered what apid cannot read ({exc})")
    return None


def _holds_nul(request: web.Request) -> bool:
    """Whether a path parameter or a query value holds NUL: the bus would cut the text there
    (``/deployments/app%00x`` would act on ``app``)."""
    values = [*request.match_info.values(), *request.query.values()]
    return any("\x00" in value for value in values)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _holds_nul(request):
        return problem_response(
            400, "the request's path or query holds a NUL character, which no name can hold"
        )
    try:
        return await handler(request)
    except web.HTTPException as http:
        if http.status < 400:
            raise
        headers = {k: v for k, v in http.headers.items() if k.lower() == "allow"}
        return problem_response(http.status, _http_detail(http, request), headers=headers)
    except Exception as exc:
        return problem_for(exc) or unexpected_problem(request, exc)


def unexpected_problem(request: web.Request, exc: BaseException) -> web.Response:
    """An error no handler expected: its stack to the journal, one sentence to the caller."""
    log.error("%s %s failed", request.method, request.rel_url.raw_path, exc_info=exc)
    return problem_response(
        500, "apid failed to answer this request; its journal says why (zlayer-apid.service)"
    )


def _http_detail(http: web.HTTPException, request: web.Request) -> str:
    if http.status == 404:
        return f"there is nothing at {request.path}; /api/v1/docs lists the routes"
    if http.status == 405:
        allowed = http.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}; use {allowed or 'another'}"
    if http.status == 413:
        return (
            "the request body is larger than apid accepts; "
            "raise max_body_bytes in apid's settings or send less"
        )
    text = http.text or ""
    # aiohttp's default text starts with the status ("400: Bad Request"): say the phrase only
    return _title(http.status) if not text or text.startswith(str(http.status)) else text
