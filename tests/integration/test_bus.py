"""The bus contract on a real dbus-daemon: errors by name, introspection XML."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from sdbus import DbusInterfaceCommonAsync, dbus_method_async

from ctl.errors import explain
from shared import bus as zbus
from shared.busdaemon import PrivateBus
from shared.introspect import render
from shared.wire.daemon import DaemonStatus

REPO = Path(__file__).resolve().parents[2]


class Probe1(DbusInterfaceCommonAsync, interface_name="org.zlayer.test.Probe1"):
    """A test-only interface whose method raises the error it is told to."""

    @dbus_method_async(input_signature="s", result_signature="s")
    async def fail_with(self, name: str) -> str:
        for error in zbus.ERRORS:
            if error.dbus_error_name.endswith("." + name):
                raise error(f"{name} raised on purpose")
        return "no such error"


@pytest.mark.parametrize("error", zbus.ERRORS, ids=lambda e: e.dbus_error_name)
def test_errors_cross_the_bus_by_name(private_bus: PrivateBus, error: type[Exception]) -> None:
    name = error.dbus_error_name.rsplit(".", 1)[1]  # type: ignore[attr-defined]

    async def scenario() -> None:
        server = zbus.open_bus(private_bus.address)
        await server.request_name_async("org.zlayer.test.Probe", 0)
        probe = Probe1()  # must stay referenced while exported
        probe.export_to_dbus("/probe", server)
        client = zbus.open_bus(private_bus.address)
        remote = Probe1.new_proxy("org.zlayer.test.Probe", "/probe", client)
        with pytest.raises(error) as info:
            await remote.fail_with(name)
        assert type(info.value) is error
        assert explain(info.value) == f"{name} raised on purpose"
        client.close()
        server.close()

    asyncio.run(scenario())


def test_busctl_sees_the_error_name(private_bus: PrivateBus) -> None:
    async def scenario() -> subprocess.CompletedProcess[str]:
        server = zbus.open_bus(private_bus.address)
        await server.request_name_async("org.zlayer.test.Probe", 0)
        probe = Probe1()  # must stay referenced while exported
        probe.export_to_dbus("/probe", server)
        proc = await asyncio.create_subprocess_exec(
            "busctl",
            f"--address={private_bus.address}",
            "call",
            "org.zlayer.test.Probe",
            "/probe",
            "org.zlayer.test.Probe1",
            "FailWith",
            "s",
            "NotFound",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        server.close()
        return subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())

    result = asyncio.run(scenario())
    assert result.returncode != 0
    assert "NotFound raised on purpose" in result.stderr


def test_status_round_trips() -> None:
    status = DaemonStatus(
        name="schedd",
        state="running",
        version="1",
        pid=42,
        started_at_usec=7,
        metrics_url="http://127.0.0.1:9301/metrics",
        supervisor="systemd",
        detail="ok",
    )
    assert DaemonStatus.from_dbus(status.to_dbus()) == status


def test_checked_in_introspection_matches_the_code() -> None:
    rendered = render()
    directory = REPO / "units" / "dbus"
    on_disk = {p.name: p.read_text() for p in directory.glob("org.zlayer.*1.xml")}
    assert sorted(on_disk) == sorted(rendered)
    for name, text in rendered.items():
        assert on_disk[name] == text, (
            f"units/dbus/{name} is stale: run `python -m shared.introspect units/dbus`"
        )
    for info in zbus.DAEMONS:
        assert f'<interface name="{info.bus_name}">' in rendered[f"{info.bus_name}.xml"]
        assert '<method name="Status">' in rendered[f"{info.bus_name}.xml"]
        assert '<property name="Version"' in rendered[f"{info.bus_name}.xml"]
