"""`zlayerctl routes` and `zlayerctl dns`: what proxyd and the service DNS serve now."""

from __future__ import annotations

import asyncio

import click

from ctl.client import Client
from ctl.output import format_option, print_json, print_table
from shared.wire import to_builtins
from shared.wire.traffic import DnsRecord, RouteInfo


@click.command()
@click.option("-d", "--deployment", help="only this deployment")
@format_option
def routes(deployment: str | None, output_format: str) -> None:
    """The routes zlayer-proxyd serves: listener, host, path and the backends in rotation."""

    async def run() -> list[RouteInfo]:
        return await Client().proxy.list_routes()

    found = [r for r in asyncio.run(run()) if not deployment or r.deployment == deployment]
    if output_format == "json":
        print_json(to_builtins(found))
        return
    print_table(
        ["DEPLOYMENT", "SERVICE", "ENDPOINT", "PROTOCOL", "LISTEN", "HOST", "PATH", "BACKENDS"],
        [
            [
                r.deployment,
                r.service,
                r.endpoint,
                r.protocol,
                r.listen,
                r.host or "*",
                r.path,
                ", ".join(r.backends) or "none (503)",
            ]
            for r in found
        ],
    )


@click.command()
@click.option("-d", "--deployment", help="only this deployment")
@format_option
def dns(deployment: str | None, output_format: str) -> None:
    """The names the service DNS answers (web.service.local, web-2.web.service.local, ...)."""

    async def run() -> list[DnsRecord]:
        return await Client().overlay.list_records()

    found = [r for r in asyncio.run(run()) if not deployment or r.deployment == deployment]
    if output_format == "json":
        print_json(to_builtins(found))
        return
    print_table(
        ["NAME", "ADDRESSES", "DEPLOYMENT", "SERVICE"],
        [[r.name, ", ".join(r.addresses) or "-", r.deployment, r.service] for r in found],
    )
