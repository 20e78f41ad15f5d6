"""``zlayerctl job``, with ``job cron enable|disable`` added to the commands of
:mod:`ctl.deploy_cmd` (the job group lives there; this module extends it)."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import click

from ctl.client import Client, resolve_deployment
from ctl.deploy_cmd import cron, job
from ctl.output import err_console

__all__ = ["job"]


class CronApi(Protocol):
    async def set_cron_enabled(self, deployment: str, service: str, enabled: bool) -> None: ...


def _switch(service: str, deployment: str | None, enabled: bool) -> None:
    async def run() -> None:
        client = Client()
        try:
            target = await resolve_deployment(client, deployment)
            await cast(CronApi, client.scheduler).set_cron_enabled(target, service, enabled)
        finally:
            client.close()
        word = "enabled" if enabled else "disabled: it does not fire until `job cron enable`"
        err_console.print(f"cron job {service} of {target} {word}", highlight=False)

    asyncio.run(run())


@cron.command("enable")
@click.argument("service")
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
def cron_enable(service: str, deployment: str | None) -> None:
    """Let cron job SERVICE fire on its schedule again (the next run from now)."""
    _switch(service, deployment, True)


@cron.command("disable")
@click.argument("service")
@click.option("-d", "--deployment", help="the deployment (default: the spec here, or the only one)")
def cron_disable(service: str, deployment: str | None) -> None:
    """Stop cron job SERVICE from firing until enabled again (kept across restarts)."""
    _switch(service, deployment, False)
