"""The ``zlayerctl`` command group and its error handling.

Commands load lazily: ``zlayerctl status`` imports the status module and what
it needs, not the build formats, wasmtime or the registry client. The table
below names each command's module and its one-line help, so ``zlayerctl
--help`` lists every command without importing any of them.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from shared import __version__

DEBUG_ENV = "ZLAYER_DEBUG"

# command name -> ("module:attribute", short help shown by `zlayerctl --help`).
# The short help is the first sentence of the command's docstring;
# tests/unit/test_ctl_lazy.py checks the two stay the same.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "build": (
        "ctl.build_cmd:build",
        "Build an image from CONTEXT (default: here) and store it under each -t name.",
    ),
    "daemon": (
        "ctl.daemon_cmd:daemon",
        "Run the six daemons under zlayerctl's own supervisor (hosts without systemd).",
    ),
    "deploy": (
        "ctl.deploy_cmd:deploy",
        "Deploy FILE and return (or show the plan with --dry-run).",
    ),
    "dns": (
        "ctl.traffic_cmd:dns",
        "The names the service DNS answers (web.service.local, web-2.web.service.local, ...).",
    ),
    "down": (
        "ctl.deploy_cmd:down",
        "Remove a deployment and everything it runs (named volumes are kept).",
    ),
    "events": (
        "ctl.deploy_cmd:events",
        "What happened to deployments: deploys, rollouts, scaling decisions, failures.",
    ),
    "exec": (
        "ctl.replica_cmd:exec_",
        "Run COMMAND in a replica of SERVICE: zlayerctl exec web -- ls /",
    ),
    "export": (
        "ctl.registry_cmd:export",
        "Write IMAGE to FILE as an oci-archive (`image import` reads it back).",
    ),
    "image": (
        "ctl.image_cmd:image",
        "Images on this node: import archives, list, inspect, remove.",
    ),
    "job": (
        "ctl.deploy_cmd:job",
        "Run jobs and see their runs and cron schedules.",
    ),
    "login": (
        "ctl.registry_cmd:login",
        "Check credentials for REGISTRY and keep them in registryd (a 0600 file).",
    ),
    "logout": (
        "ctl.registry_cmd:logout",
        "Forget the credentials registryd keeps for REGISTRY.",
    ),
    "logs": (
        "ctl.replica_cmd:logs",
        "Print a service's logs (every replica, or one with --instance).",
    ),
    "pipeline": (
        "ctl.build_cmd:pipeline",
        "Build the images of a ZPipeline in dependency order.",
    ),
    "ps": (
        "ctl.deploy_cmd:ps",
        "Show deployments and their services (or replicas with --containers).",
    ),
    "pull": (
        "ctl.registry_cmd:pull",
        "Pull IMAGE from its registry (`nginx` means docker.io/library/nginx:latest).",
    ),
    "rollback": (
        "ctl.deploy_cmd:rollback",
        "Return a deployment to its previous revision (rolled out like any deploy).",
    ),
    "routes": (
        "ctl.traffic_cmd:routes",
        "The routes zlayer-proxyd serves: listener, host, path and the backends in rotation.",
    ),
    "runtimes": (
        "ctl.build_cmd:runtimes_",
        "List the runtime templates, or print the Dockerfile of template NAME.",
    ),
    "scale": (
        "ctl.deploy_cmd:scale",
        "Hold SERVICE at REPLICAS replicas until the next deploy.",
    ),
    "spec": (
        "ctl.spec_cmd:spec",
        "Show a deployment spec normalised, or its JSON Schema.",
    ),
    "status": (
        "ctl.status_cmd:status",
        "Show each daemon's state, version, pid and supervisor.",
    ),
    "stop": (
        "ctl.deploy_cmd:stop",
        "Stop a deployment's replicas (or one service's) and keep the deployment.",
    ),
    "system": (
        "ctl.registry_cmd:system",
        "Node-wide housekeeping.",
    ),
    "up": (
        "ctl.deploy_cmd:up",
        "Deploy FILE and follow it; Ctrl-C tears the deployment down (-b/-d return instead).",
    ),
    "validate": (
        "ctl.spec_cmd:validate",
        "Check a deployment spec and list every problem in it.",
    ),
    "wasm": (
        "ctl.wasm_cmd:wasm",
        "WebAssembly binaries: validate, inspect, export and push as OCI artifacts.",
    ),
}


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
@click.version_option(__version__, prog_name="zlayerctl")
def cli() -> None:
    """ZLayer: container orchestration as simple as docker compose."""


def main() -> None:
    """Run zlayerctl; any failure becomes one sentence on stderr and exit 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except BaseException as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        from ctl.errors import explain
        from ctl.output import fail

        fail(explain(exc))


if __name__ == "__main__":
    main()
