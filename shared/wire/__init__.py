"""The typed wire: every value that crosses the bus, one module per interface.

Rich values travel over D-Bus as JSON text (type ``s``) of the msgspec
Structs defined here; :func:`encode` makes the text and :func:`decode` reads
it back into the named type, validating as it parses, so both ends are
typed and a malformed value fails at the boundary with :class:`WireError`.

- :mod:`shared.wire.daemon`: what every interface answers (``Status``);
- :mod:`shared.wire.scheduler`: schedd (deployments, events, cron);
- :mod:`shared.wire.agent`: agentd (assignments, replicas, job runs);
- :mod:`shared.wire.registry`: registryd (images, prune results);
- :mod:`shared.wire.jobs`: long operations of any daemon;
- :mod:`shared.wire.traffic`: the traffic views schedd sends overlayd and
  proxyd, and what they report back (DNS records, routes, counters);
- :mod:`shared.wire.overlay`: overlayd (attachments, the node network);
- :mod:`shared.wire.mesh`: overlayd's WireGuard mesh (MeshStatus, MeshPeer);
- :mod:`shared.wire.cluster`: what a cluster keeps in etcd and sends between
  nodes (node records, placements, the join handshake).

Why msgspec and not pydantic here: these modules are imported by every
process, zlayerctl's read commands included, and msgspec imports and builds
its decoders in a few milliseconds where pydantic's model building costs tens;
it also writes the JSON Schema the REST API publishes (:func:`schema`). The
deployment spec, a document people write, stays pydantic (``shared.spec``).

A Struct is not validated when constructed in Python, only when decoded:
build them with the right types (mypy checks the constructors).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")
S = TypeVar("S", bound="Wire")


class Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every bus value: unknown fields refused, instances immutable.

    msgspec applies ``kw_only`` to the fields of the class that sets it, so a
    subclass with a required field after a defaulted one sets it again; each
    subclass also says ``frozen=True``, for mypy (msgspec would inherit it).
    """


class MutableWire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of the few bus values a daemon updates in place (a running job's progress)."""


class WireError(ValueError):
    """A bus value that does not decode as the type it should be, in one sentence."""


_encoder = msgspec.json.Encoder()


def encode(value: object) -> str:
    """JSON text of a Struct, a list or dict of them, or plain data."""
    return _encoder.encode(value).decode()


def decode(text: str | bytes, into: type[T]) -> T:
    """Read JSON text as ``into`` (a Struct, ``list[Struct]``, ...); WireError if it is not one."""
    try:
        return msgspec.json.decode(text, type=into)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise WireError(f"not a {_type_name(into)} ({exc})") from exc


def convert(value: Any, into: type[T]) -> T:
    """Plain data (dicts, lists) as ``into``, validated; WireError if it does not fit."""
    try:
        return msgspec.convert(value, type=into)
    except msgspec.ValidationError as exc:
        raise WireError(f"not a {_type_name(into)} ({exc})") from exc


def to_builtins(value: object) -> Any:
    """A Struct (or a container of them) as dicts and lists, as JSON would carry it."""
    return msgspec.to_builtins(value)


def replace(value: S, **changes: Any) -> S:
    """A copy of a Struct with some fields changed."""
    return msgspec.structs.replace(value, **changes)


def schema(*types: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """JSON Schema of the given types: (one schema per type, shared ``$defs`` components)."""
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    return dict(zip((_type_name(t) for t in types), schemas, strict=True)), components


def _type_name(into: Any) -> str:
    name = getattr(into, "__name__", None)
    if isinstance(name, str) and not getattr(into, "__args__", None):
        return name
    return re.sub(r"\b[\w.]+\.", "", str(into))  # list[shared.wire.agent.X] -> list[X]
