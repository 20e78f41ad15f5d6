"""The ``zlayerctl`` click group: commands listed from ``ctl.main.LAZY_COMMANDS`` and
imported only when one runs.

Apart from ``ctl.main`` so that the read commands ``ctl.main`` runs without
click (``ctl.readargs``) never import it; ``ctl.main`` hands out ``cli`` and
``LazyGroup`` on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from ctl.main import LAZY_COMMANDS
from shared import __version__


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when one is run.

    ``lazy_commands`` maps a command name to ``("module:attribute", short
    help)``; ``--help`` lists the names with their short help and imports
    nothing.
    """

    def __init__(
        self,
        *args: Any,
        lazy_commands: dict[str, tuple[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            self.add_command(self._load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            # click >= 8.4 suggests "Did you mean 'status'?" from the loaded commands only;
            # suggest from every command
            name = getattr(exc, "command_name", None)
            if name is None:
                raise
            raise type(exc)(name, possibilities=self.list_commands(ctx), ctx=ctx) from None  # type: ignore[call-arg]

    def _load(self, cmd_name: str) -> click.Command:
        target, _ = self.lazy_commands[cmd_name]
        module_name, attribute = target.split(":", 1)
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List every command with its short help, importing only those not in the table."""
        rows: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            if name in self.commands or name not in self.lazy_commands:
                command = self.get_command(ctx, name)
            else:
                command = click.Command(name, help=self.lazy_commands[name][1])
            if command is not None and not command.hidden:
                rows.append((name, command))
        if not rows:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in rows)
        with formatter.section("Commands"):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])


@click.group(
    cls=LazyGroup,
    lazy_commands=LAZY_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--host",
    metavar="URL",
    help="send the command to this node's API (https://node:3669); "
    "else ZLAYER_HOST, the current context, or this node's bus",
)
@click.version_option(__version__, prog_name="zlayerctl")
def cli(host: str | None) -> None:
    """ZLayer: container orchestration as simple as docker compose."""
    if host is not None:  # ctl.main takes it before click; this is for the group called directly
        from ctl.readargs import set_host_option

        set_host_option(host)
