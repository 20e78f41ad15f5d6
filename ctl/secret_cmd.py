"""``zlayerctl secret``: set, list, read and remove the secrets schedd keeps (root only).

A value is read from stdin (without echo when stdin is a terminal) or from
``--from-file``, never from the command line, where other users could read
it in the process list and the shell would keep it in its history. It is
taken as is: ``printf %s "$PW" | zlayerctl secret set db-password`` stores no
newline.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import click

from ctl.client import Client
from ctl.output import err_console, fail, format_option, print_rows

if TYPE_CHECKING:
    from shared.wire.api import SecretInfo, SecretValue

T = TypeVar("T")


class SecretsApi(Protocol):
    """Scheduler1's secret methods, as the bus client and the API client both offer them."""

    async def set_secret(self, name: str, deployment: str, value: str) -> SecretInfo: ...

    async def list_secrets(self) -> list[SecretInfo]: ...

    async def get_secret(self, name: str, deployment: str) -> SecretValue: ...

    async def remove_secret(self, name: str, deployment: str) -> None: ...


def _call(do: Callable[[SecretsApi], Awaitable[T]]) -> T:
    async def run() -> T:
        client = Client()
        try:
            return await do(cast(SecretsApi, client.scheduler))
        finally:
            client.close()

    return asyncio.run(run())


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


def _scope(deployment: str) -> str:
    return f"of deployment {deployment}" if deployment else "(node-wide)"


def read_value(name: str, from_file: Path | None) -> str:
    """The value to store: the file's text, or stdin's (asked for without echo on a terminal)."""
    if from_file is not None:
        try:
            data = from_file.read_bytes()
        except OSError as exc:
            fail(f"cannot read {from_file}: {exc.strerror or exc}")
    elif sys.stdin.isatty():
        import getpass

        text = getpass.getpass(f"value of secret {name} (not shown): ")
        if text != getpass.getpass("again: "):
            fail("the two values differ; nothing was stored")
        data = text.encode()
    else:
        data = sys.stdin.buffer.read()
    if not data:
        fail(f"the value of secret {name} is empty; give it on stdin or with --from-file")
    if b"\0" in data:
        fail(
            f"the value of secret {name} holds a NUL byte, which a secret cannot hold; "
            "encode it first (base64 < FILE | zlayerctl secret set NAME)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        fail(
            f"the value of secret {name} is not UTF-8 text; encode it first "
            "(base64 < FILE | zlayerctl secret set NAME)"
        )


deployment_option = click.option(
    "-d",
    "--deployment",
    default="",
    metavar="D",
    help="the secret of deployment D only (default: the node-wide one)",
)


@click.group()
def secret() -> None:
    """Secrets for `$S:NAME` in a service's env: set, list, read, remove (root only)."""


@secret.command("set")
@click.argument("name")
@deployment_option
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="read the value from this file (default: stdin)",
)
def set_(name: str, deployment: str, from_file: Path | None) -> None:
    """Set secret NAME from stdin or --from-file; the services that read it roll."""
    value = read_value(name, from_file)
    stored = _call(lambda api: api.set_secret(name, deployment, value))
    what = "set" if stored.version == 1 else f"changed (version {stored.version})"
    err_console.print(f"secret {name} {_scope(deployment)} {what}", highlight=False)


@secret.command("ls")
@format_option
def ls(output_format: str) -> None:
    """List secrets: names, deployments and times, never a value."""
    rows = _call(lambda api: api.list_secrets())
    print_rows(
        output_format,
        rows,
        ["NAME", "DEPLOYMENT", "VERSION", "CREATED", "UPDATED"],
        lambda s: [
            s.name,
            s.deployment or "(node-wide)",
            s.version,
            _when(s.created_at),
            _when(s.updated_at),
        ],
    )


@secret.command("get")
@click.argument("name")
@deployment_option
def get(name: str, deployment: str) -> None:
    """Print the value of secret NAME (root only)."""
    found = _call(lambda api: api.get_secret(name, deployment))
    sys.stdout.write(found.value)
    if sys.stdout.isatty() and not found.value.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


@secret.command("rm")
@click.argument("name")
@deployment_option
def rm(name: str, deployment: str) -> None:
    """Remove secret NAME; the services that read it roll to the node-wide one."""
    _call(lambda api: api.remove_secret(name, deployment))
    err_console.print(f"secret {name} {_scope(deployment)} removed", highlight=False)
