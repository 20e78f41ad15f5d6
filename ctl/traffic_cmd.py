"""`zlayerctl routes` and `zlayerctl dns`: what proxyd and the service DNS serve now.

Their bodies are in ``ctl.reads``, which ``ctl.main`` also runs without click.
"""

from __future__ import annotations

import click

from ctl import reads
from ctl.output import format_option


@click.command()
@click.option("-d", "--deployment", help="only this deployment")
@format_option
def routes(deployment: str | None, output_format: str) -> None:
    """The routes zlayer-proxyd serves: listener, host, path and the backends in rotation."""
    reads.routes(deployment, output_format)


@click.command()
@click.option("-d", "--deployment", help="only this deployment")
@format_option
def dns(deployment: str | None, output_format: str) -> None:
    """The names the service DNS answers (web.service.local, web-2.web.service.local, ...)."""
    reads.dns(deployment, output_format)
