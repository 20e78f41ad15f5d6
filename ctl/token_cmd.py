"""``zlayerctl token``: make, list and revoke the REST API's bearer tokens: on the node
over the bus (root), or through a node's API with an admin token (``--host``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from ctl.client import Client
from ctl.output import fail, format_option, print_json, print_rows
from ctl.protocols import TokensApi
from shared.wire import to_builtins
from shared.wire.api import TokenCreate, TokenInfo

T = TypeVar("T")
ROLES = ("viewer", "operator", "admin")


def _call(do: Callable[[TokensApi], Awaitable[T]]) -> T:
    async def run() -> T:
        client = Client()
        try:
            return await do(client.api)
        finally:
            client.close()

    return asyncio.run(run())


def _ttl_seconds(text: str | None) -> int | None:
    if text is None:
        return None
    from shared.spec.quantities import parse_duration

    try:
        seconds = int(parse_duration(text).total_seconds())
    except ValueError:
        fail(f"--ttl {text} is not a duration; write it as 30m, 24h or 90d")
    if seconds < 1:
        fail(f"--ttl {text} is shorter than a second; give at least 1s")
    return seconds


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


def _state(info: TokenInfo, now: float) -> str:
    if info.revoked:
        return "revoked"
    if info.expires_at is not None and info.expires_at <= now:
        return "expired"
    return "active"


@click.group()
def token() -> None:
    """Bearer tokens of the REST API: create, list, revoke."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help="what the token may do")
@click.option(
    "--deployment",
    "deployments",
    multiple=True,
    metavar="D",
    help="limit the token to this deployment (repeat for more; none: every deployment)",
)
@click.option("--ttl", default=None, help="how long the token lives (24h, 30d); none: for ever")
@format_option
def create(
    name: str, role: str, deployments: tuple[str, ...], ttl: str | None, output_format: str
) -> None:
    """Make the token NAME and print it (once: it is not kept anywhere)."""
    request = TokenCreate(
        name=name,
        role=role,  # type: ignore[arg-type]  # click.Choice checked it
        deployments=list(deployments),
        ttl_seconds=_ttl_seconds(ttl),
    )
    issued = _call(lambda api: api.create_token(request))
    if output_format == "json":
        print_json(to_builtins(issued))
        return
    click.echo(issued.token)
    info = issued.info
    scope = ", ".join(info.deployments) or "every deployment"
    click.echo(
        f"token {info.name}: {info.role} of {scope}, expires {_when(info.expires_at)}; "
        "it is shown only now, keep it safe",
        err=True,
    )


@token.command("ls")
@format_option
def ls(output_format: str) -> None:
    """List the tokens (never their text)."""
    tokens = _call(lambda api: api.list_tokens())
    now = time.time()
    print_rows(
        output_format,
        tokens,
        ("NAME", "ROLE", "DEPLOYMENTS", "CREATED", "EXPIRES", "STATE"),
        lambda t: (
            t.name,
            t.role,
            ",".join(t.deployments) or "*",
            _when(t.created_at),
            _when(t.expires_at),
            _state(t, now),
        ),
    )


@token.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke the token NAME at once: its next request is refused."""
    info = _call(lambda api: api.revoke_token(name))
    click.echo(f"revoked token {info.name}")
