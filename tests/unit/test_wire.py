"""shared.wire: the bus values decode strictly, describe themselves, and are the only way in."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import msgspec
import pytest

import shared.wire
from shared.wire import MutableWire, Wire, WireError, decode, encode, schema
from shared.wire.agent import ReplicaInfo, SyncResult
from shared.wire.scheduler import DeploymentStatus, ServiceStatus

REPO = Path(__file__).resolve().parents[2]


def wire_types() -> list[type]:
    found: dict[str, type] = {}
    for module_info in pkgutil.iter_modules(shared.wire.__path__):
        module = importlib.import_module(f"shared.wire.{module_info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, (Wire, MutableWire))
                and value not in (Wire, MutableWire)
                and value.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = value
    return list(found.values())


def test_every_bus_value_has_a_json_schema_for_the_rest_api() -> None:
    types = wire_types()
    assert len(types) >= 25, [t.__name__ for t in types]
    schemas, components = schema(*types)
    assert set(schemas) == {t.__name__ for t in types}
    for name in schemas:
        assert components[name]["type"] == "object", name


def test_a_value_round_trips_and_unknown_or_wrong_fields_are_refused_in_one_sentence() -> None:
    status = DeploymentStatus(
        name="web",
        revision=2,
        state="running",
        services=[
            ServiceStatus(
                name="api",
                rtype="service",
                image="a:1",
                desired=2,
                running=2,
                healthy=2,
                state="running",
            )
        ],
        created_at=1.0,
        updated_at=2.5,
    )
    assert decode(encode(status), DeploymentStatus) == status
    assert decode(encode([status]), list[DeploymentStatus]) == [status]

    text = encode(SyncResult(generation=4, accepted=True, removed=[("web", "gone")]))
    with pytest.raises(WireError) as caught:
        decode(text.replace('"accepted"', '"accepted_late"'), SyncResult)
    assert "SyncResult" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(WireError, match="ReplicaInfo"):
        decode('{"id": "x", "state": "sleeping"}', ReplicaInfo)
    with pytest.raises(WireError, match=r"list\[ReplicaInfo\]"):
        decode("{not json", list[ReplicaInfo])


def test_bus_values_are_immutable() -> None:
    result = SyncResult(generation=1, accepted=False)
    with pytest.raises(AttributeError):
        result.generation = 2  # type: ignore[misc]
    assert isinstance(result, msgspec.Struct)


def test_only_the_typed_clients_make_proxies() -> None:
    """Every bus call goes through shared/clients.py, so mypy checks its types: nothing
    else makes a proxy, or reaches through a typed client to the raw one it holds."""
    clients = REPO / "shared" / "clients.py"
    allowed = {clients, REPO / "shared" / "introspect.py"}
    offenders = []
    for top in ("shared", "daemons", "ctl"):
        for path in (REPO / top).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Attribute):
                    continue
                made = node.attr == "new_proxy" and path not in allowed
                # another object's _proxy (a class's own private _proxy is its business)
                owner = node.value
                reached = (
                    node.attr == "_proxy"
                    and path != clients
                    and not (isinstance(owner, ast.Name) and owner.id == "self")
                )
                if made or reached:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert offenders == []
    import shared.bus

    assert not hasattr(shared.bus, "proxy"), "the untyped proxy() helper is gone"
