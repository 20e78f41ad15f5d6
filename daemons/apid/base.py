"""What every route handler shares: the clients over apid's bus connection, JSON replies,
request bodies and query parameters read with one sentence when they are wrong."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
from aiohttp import web
from sdbus import SdBus

from daemons.apid.problems import ApiProblem
from daemons.apid.routing import can_see
from shared.clients import (
    AgentClient,
    OverlayClient,
    ProxyClient,
    RegistryClient,
    SchedulerClient,
)
from shared.wire import WireError, decode, encode
from shared.wire.daemon import DaemonStatus

JSON = "application/json"
DEFAULT_MAX_BODY = 16 * 1024 * 1024


@dataclass
class Api:
    """What every handler shares: the typed clients over apid's one bus connection."""

    bus: SdBus
    node_name: str
    address: str
    # apid's own status (it does not call itself over the bus)
    own_status: Callable[[], DaemonStatus]
    # bytes of a build context, as sent and once unpacked (settings: max_build_context_bytes)
    max_build_context_bytes: int
    scheduler: SchedulerClient = field(init=False)
    agent: AgentClient = field(init=False)
    registry: RegistryClient = field(init=False)
    overlay: OverlayClient = field(init=False)
    proxy: ProxyClient = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = SchedulerClient(self.bus)
        self.agent = AgentClient(self.bus)
        self.registry = RegistryClient(self.bus)
        self.overlay = OverlayClient(self.bus)
        self.proxy = ProxyClient(self.bus)


API_KEY = web.AppKey("zlayer_api", Api)


def api(request: web.Request) -> Api:
    return request.app[API_KEY]


class _OfDeployment(Protocol):
    @property
    def deployment(self) -> str: ...


OfDeployment = TypeVar("OfDeployment", bound=_OfDeployment)


def visible(request: web.Request, found: Iterable[OfDeployment]) -> list[OfDeployment]:
    """Those of ``found`` whose deployment the caller's token reaches (listings filter so)."""
    return [item for item in found if can_see(request, item.deployment)]


def reply(value: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A wire value (a Struct, a list of them, plain data) as the JSON reply."""
    return web.Response(text=encode(value), status=status, headers=headers, content_type=JSON)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    return False


def refuse_nul(value: Any) -> None:
    """400 for a body text holding NUL: the bus would cut it there (an exec of ``a\0b``
    ran ``a``), so it is refused before any call."""
    if _holds_nul(msgspec.to_builtins(value)):
        raise ApiProblem(
            400, "the request body holds a NUL character, which the daemons cannot take"
        )


async def body_as(request: web.Request, into: type[Any]) -> Any:
    """The request's JSON body as ``into``; 400 with the decoder's sentence if it is not one."""
    raw = await request.read()
    try:
        value = decode(raw, into)
    except WireError as exc:
        raise ApiProblem(400, f"the request body is {exc}") from None
    refuse_nul(value)
    return value


def query_flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiProblem(400, f"?{name}= must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise ApiProblem(400, f"?{name}= must be between {low} and {high}, not {value}")
    return value
