"""agentd beside an overlayd of the release before Overlay1.Reserve (a node midway through
an upgrade): a replica's network is reserved through Attach instead, on a real dbus-daemon.

The older overlayd is a stand-in process that serves only Attach on overlayd's name and
object, as that release's Overlay1 did: the current overlayd cannot be made to lack the
method.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from daemons.agentd.main import BusNeighbours
from shared import bus as zbus
from shared.busdaemon import PrivateBus

OVERLAY = zbus.DAEMONS_BY_NAME["overlayd"]

OLD_OVERLAYD = """
import asyncio, os, sys
import sdbus
from sdbus import DbusInterfaceCommonAsync, dbus_method_async
from shared.wire import encode
from shared.wire.overlay import Attachment

address, name, path, calls_file = sys.argv[1:]
calls = open(calls_file, "a")

# not shared.bus: it defines today's Overlay1, and sdbus takes one class per interface
class OverlayBeforeReserve(DbusInterfaceCommonAsync, interface_name=name):
    @dbus_method_async(input_signature="ss", result_signature="s")
    async def attach(self, container_id: str, hostname: str) -> str:
        calls.write(f"Attach {container_id} {hostname}\\n")
        calls.flush()
        return encode(Attachment(
            container_id=container_id, netns="/run/netns/zl-test", interface="eth0",
            address="10.200.0.7", prefix_len=24, gateway="10.200.0.1", dns=["10.200.0.1"],
            host_veth="zlv-test", bridge="zl0",
        ))

async def main() -> None:
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    bus = sdbus.sd_bus_open_system()
    await bus.request_name_async(name, 0)
    service = OverlayBeforeReserve()
    service.export_to_dbus(path, bus)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_reserve_falls_back_to_attach_on_an_overlayd_without_it(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"
    old = subprocess.Popen(
        [
            sys.executable,
            "-c",
            OLD_OVERLAYD,
            private_bus.address,
            OVERLAY.bus_name,
            OVERLAY.object_path,
            str(calls),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert old.stdout is not None and old.stdout.readline() == "ready\n"

        async def reserve() -> tuple[str, str]:
            bus = zbus.open_bus(private_bus.address)
            try:
                reserved = await BusNeighbours(bus).reserve("web-1-abc", "web-1")
            finally:
                bus.close()
            return reserved.container_id, reserved.address

        assert asyncio.run(reserve()) == ("web-1-abc", "10.200.0.7")
        assert calls.read_text() == "Attach web-1-abc web-1\n"
    finally:
        old.kill()
        old.wait(timeout=10)
