"""The ``zlayerctl`` command group and its error handling."""

from __future__ import annotations

import os
import sys

import click

from ctl.build_cmd import build, pipeline, runtimes_
from ctl.daemon_cmd import daemon
from ctl.deploy_cmd import deploy, down, events, job, ps, rollback, scale, stop, up
from ctl.image_cmd import image
from ctl.registry_cmd import export, login, logout, pull, system
from ctl.replica_cmd import exec_, logs
from ctl.spec_cmd import spec, validate
from ctl.status_cmd import status
from ctl.traffic_cmd import dns, routes
from ctl.wasm_cmd import wasm
from shared import __version__

DEBUG_ENV = "ZLAYER_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zlayerctl")
def cli() -> None:
    """ZLayer: container orchestration as simple as docker compose."""


cli.add_command(daemon)
for command in (up, down, deploy, rollback, ps, events, stop, scale, job, logs, exec_):
    cli.add_command(command)
cli.add_command(status)
cli.add_command(routes)
cli.add_command(dns)
cli.add_command(validate)
cli.add_command(spec)
cli.add_command(image)
cli.add_command(wasm)
cli.add_command(pull)
cli.add_command(login)
cli.add_command(logout)
cli.add_command(export)
cli.add_command(system)
for command in (build, pipeline, runtimes_):
    cli.add_command(command)


def main() -> None:
    """Run zlayerctl; any failure becomes one sentence on stderr and exit 1."""
    from ctl.errors import explain

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
        from ctl.output import fail

        fail(explain(exc))
