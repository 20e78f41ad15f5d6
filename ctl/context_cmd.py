"""``zlayerctl context``: named nodes to send commands to (their API URL, token and CA).

Contexts live in ``$XDG_CONFIG_HOME/zlayer/contexts.toml`` (``~/.config`` by
default), mode 0600 because it holds the tokens; ``context use NAME`` makes one
current, so every command goes to that node until ``context use --local`` or
``context rm``. ``--host`` and ``ZLAYER_HOST`` still win over it for one command.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import click

from ctl.contexts import TargetError, check_host, read_contexts
from ctl.output import err_console, fail, format_option, print_rows
from ctl.readargs import config_dir, contexts_path


def _load() -> dict[str, Any]:
    try:
        table = read_contexts() or {}
    except TargetError as exc:
        fail(str(exc))
    contexts = table.get("contexts")
    table["contexts"] = contexts if isinstance(contexts, dict) else {}
    return table


def _quoted(value: str) -> str:
    # a JSON string is a TOML basic string (ASCII, with \uXXXX escapes)
    return json.dumps(value, ensure_ascii=True)


def render(table: dict[str, Any]) -> str:
    """The contexts file's text for ``table`` (current, then one table per context)."""
    lines = ["# zlayerctl contexts: `zlayerctl context ls|add|use|rm`"]
    current = table.get("current")
    if isinstance(current, str) and current:
        lines.append(f"current = {_quoted(current)}")
    for name, entry in sorted(table["contexts"].items()):
        lines.append("")
        lines.append(f"[contexts.{_quoted(name)}]")
        for key in ("host", "token", "ca_file"):
            value = entry.get(key)
            if isinstance(value, str) and value:
                lines.append(f"{key} = {_quoted(value)}")
    return "\n".join(lines) + "\n"


def _save(table: dict[str, Any]) -> None:
    """Write the contexts file 0600 (it holds tokens), replacing it at once."""
    directory = config_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = contexts_path()
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(render(table))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _read_token(token_file: str | None) -> str:
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            fail(f"cannot read the token file {token_file}: {exc.strerror}")
    if sys.stdin.isatty():
        err_console.print("paste the token, then press Enter:", highlight=False)
        return sys.stdin.readline().strip()
    return sys.stdin.read().strip()


@click.group()
def context() -> None:
    """Named nodes zlayerctl sends commands to: their API URL, token and CA."""


@context.command("add")
@click.argument("name")
@click.option("--host", "host", required=True, help="the node's API, e.g. https://node:3669")
@click.option("--token-file", type=click.Path(dir_okay=False), help="read the token from this file")
@click.option("--no-token", is_flag=True, help="keep no token (an API without authentication)")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="the CA certificate to trust")
@click.option("--use", "use_it", is_flag=True, help="make it the current context")
def context_add(
    name: str,
    host: str,
    token_file: str | None,
    no_token: bool,
    ca_file: str | None,
    use_it: bool,
) -> None:
    """Save NAME as the node at --host (the token from --token-file, else from stdin)."""
    try:
        base = check_host(host)
    except TargetError as exc:
        fail(str(exc))
    entry: dict[str, str] = {"host": base}
    token = "" if no_token else _read_token(token_file)
    if token:
        entry["token"] = token
    if ca_file:
        if not os.path.isfile(ca_file):
            fail(f"{ca_file} is not a file; give the CA certificate's PEM file")
        entry["ca_file"] = os.path.abspath(ca_file)
    table = _load()
    table["contexts"][name] = entry
    if use_it:
        table["current"] = name
    _save(table)
    note = (
        " and made it current" if use_it else f"; `zlayerctl context use {name}` makes it current"
    )
    err_console.print(f"saved context {name} ({base}){note}", highlight=False)


@context.command("ls")
@format_option
def context_ls(output_format: str) -> None:
    """List the contexts; the current one is marked."""
    table = _load()
    current = table.get("current", "")
    rows = [
        {
            "name": name,
            "host": entry.get("host", ""),
            "current": name == current,
            "token": bool(entry.get("token")),
            "ca_file": entry.get("ca_file", ""),
        }
        for name, entry in sorted(table["contexts"].items())
        if isinstance(entry, dict)
    ]
    print_rows(
        output_format,
        rows,
        ["CURRENT", "NAME", "HOST", "TOKEN", "CA FILE"],
        lambda r: [
            "*" if r["current"] else "",
            r["name"],
            r["host"],
            "yes" if r["token"] else "no",
            r["ca_file"],
        ],
    )


@context.command("use")
@click.argument("name", required=False)
@click.option("--local", is_flag=True, help="send commands to this node's bus again")
def context_use(name: str | None, local: bool) -> None:
    """Send every command to context NAME from now on (--local: to this node's bus)."""
    table = _load()
    if local or not name:
        if not local:
            fail("name a context, or give --local for this node's bus")
        table.pop("current", None)
        _save(table)
        err_console.print("commands go to this node's bus", highlight=False)
        return
    if name not in table["contexts"]:
        have = ", ".join(sorted(table["contexts"])) or "none"
        fail(f"there is no context {name} (contexts: {have}); add it with `zlayerctl context add`")
    table["current"] = name
    _save(table)
    err_console.print(
        f"commands go to {table['contexts'][name].get('host')} ({name})", highlight=False
    )


@context.command("rm")
@click.argument("name")
def context_rm(name: str) -> None:
    """Forget context NAME (and its token)."""
    table = _load()
    if name not in table["contexts"]:
        fail(f"there is no context {name}; `zlayerctl context ls` lists them")
    del table["contexts"][name]
    if table.get("current") == name:
        table.pop("current")
    _save(table)
    err_console.print(f"removed context {name}", highlight=False)
