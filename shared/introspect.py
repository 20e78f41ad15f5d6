"""Generate the introspection XML of the ZLayer bus interfaces.

The files in ``units/dbus/org.zlayer.<Name>1.xml`` are what ``busctl
introspect`` shows for each daemon, written from the interface classes in
:mod:`shared.bus` by exporting them on a private dbus-daemon and asking it.
Run ``python -m shared.introspect units/dbus`` after changing an interface;
a test fails while the checked-in files differ from the code.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from shared.bus import DAEMONS, DaemonInfo, Job1, open_bus
from shared.busdaemon import PrivateBus

_HEADER = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "https://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)


def _interface_only(xml: str, interface_name: str) -> str:
    """Keep just one interface of an Introspect answer, in a stable layout."""
    root = ET.fromstring(xml)
    node = ET.Element("node")
    for element in root.findall("interface"):
        if element.get("name") == interface_name:
            node.append(element)
    ET.indent(node, space="  ")
    return _HEADER + ET.tostring(node, encoding="unicode") + "\n"


async def _introspect_all(address: str) -> dict[str, str]:
    bus = open_bus(address)
    documents: dict[str, str] = {}
    exported = []  # keep the objects alive while the bus introspects them
    for info in DAEMONS:
        obj = info.interface()
        obj.export_to_dbus(info.object_path, bus)
        exported.append(obj)
    for info in DAEMONS:
        await bus.request_name_async(info.bus_name, 0)
        remote = info.interface.new_proxy(info.bus_name, info.object_path, bus)
        xml = await remote.dbus_introspect()
        documents[f"{info.bus_name}.xml"] = _interface_only(xml, info.bus_name)
    # Job objects are not a daemon's own: exported under a daemon's path per job.
    job = Job1()
    job.export_to_dbus("/org/zlayer/Job1", bus)
    exported.append(job)
    xml = await Job1.new_proxy(DAEMONS[0].bus_name, "/org/zlayer/Job1", bus).dbus_introspect()
    documents["org.zlayer.Job1.xml"] = _interface_only(xml, "org.zlayer.Job1")
    bus.close()
    return documents


def render(info_list: tuple[DaemonInfo, ...] = DAEMONS) -> dict[str, str]:
    """File name -> XML text for every interface, from the code."""
    with tempfile.TemporaryDirectory(prefix="zlayer-introspect-") as tmp:
        bus = PrivateBus(Path(tmp) / "bus.sock")
        address = bus.start()
        try:
            return asyncio.run(_introspect_all(address))
        finally:
            bus.stop()


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "units/dbus")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (target / name).write_text(text)
        print(target / name)


if __name__ == "__main__":
    main()
