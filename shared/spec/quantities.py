"""Durations and sizes as written in deployment specs.

Owns the two scalar notations the spec uses: durations such as ``500ms``,
``30s``, ``5m``, ``1h30m`` (parsed into :class:`datetime.timedelta`) and sizes
such as ``64Mi``, ``1Gi``, ``512M`` or a plain byte count (parsed into an int of
bytes), plus the annotated pydantic types that read and print them.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from shared.spec.errors import describe_value
from shared.spec.limits import MAX_DURATION, MAX_SIZE

__all__ = [
    "DURATION_PATTERN",
    "SIZE_PATTERN",
    "Duration",
    "Size",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

_DURATION_UNITS: dict[str, timedelta] = {
    "ns": timedelta(microseconds=0.001),
    "us": timedelta(microseconds=1),
    "µs": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d|w)")
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?\s*(ns|us|µs|ms|s|m|h|d|w)\s*)+$"

# Decimal (K, M, ...) and binary (Ki, Mi, ...) multipliers, as Kubernetes and
# upstream ZLayer write them; an optional trailing B ("MiB", "MB") is tolerated.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|k|K|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)B?\s*$")
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKMGTPE]i?)?B?\s*$"


def parse_duration(value: Any) -> timedelta:
    """Read ``"30s"``, ``"1h30m"``, ``"500ms"``; a bare number is refused (no unit)."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as 30s or 5m, got {describe_value(value)}")
    if isinstance(value, int | float):
        raise ValueError(f"a duration needs a unit: write {value}s, {value}m or {value}ms")
    text = value.strip()
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"{_shown(value)} is not a duration; write a number and a unit (ms, s, m, h, d), "
            "e.g. 30s"
        )
    total = timedelta()
    try:
        for number, unit in _DURATION_PART.findall(text):
            total += _DURATION_UNITS[unit] * float(number)
    except OverflowError:
        total = timedelta.max
    if total > MAX_DURATION:
        raise ValueError(
            f"{_shown(value)} is longer than {format_duration(MAX_DURATION)}, the longest "
            "duration a spec may hold"
        )
    return total


def format_duration(value: timedelta) -> str:
    """The shortest spec string for ``value``: ``30s``, ``1h30m``, ``500ms``."""
    micros = round(value.total_seconds() * 1_000_000)
    if micros == 0:
        return "0s"
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    parts: list[str] = []
    for unit, size in (
        ("d", 86_400_000_000),
        ("h", 3_600_000_000),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
        ("us", 1),
    ):
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


def parse_size(value: Any) -> int:
    """Read ``"512Mi"``, ``"1G"``, ``"64Mi"`` or a byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512Mi or 1Gi, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        if value > MAX_SIZE:
            raise _too_big(value)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a size must be a finite number, not {value}")
        raise ValueError(f"a size needs a unit or whole bytes: write {value}Gi or {int(value)}")
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512Mi or 1Gi, got {describe_value(value)}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(
            f"{_shown(value)} is not a size; write e.g. 512Mi, 1Gi, 500M or a byte count"
        )
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit]
    if not size <= MAX_SIZE:  # also catches a number too long to be finite
        raise _too_big(value)
    return round(size)


def _too_big(value: Any) -> ValueError:
    limit = format_size(MAX_SIZE)
    return ValueError(f"{_shown(value)} is larger than {limit}, the largest size a spec may hold")


def _shown(value: Any) -> str:
    """A value quoted in a sentence, cut short when it is long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_size(value: int) -> str | int:
    """The largest exact binary unit (``1Gi``, ``512Mi``); otherwise plain bytes."""
    for unit in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        size = _SIZE_UNITS[unit]
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["30s", "5m"]}),
]
"""A spec duration: reads ``"30s"``, holds a timedelta, prints ``"30s"`` in JSON."""

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "examples": ["512Mi", "1Gi"],
        }
    ),
]
"""A spec size: reads ``"512Mi"`` or bytes, holds bytes, prints ``"512Mi"`` in JSON."""
