"""The k8s-file log format conmon writes, read back for ``zlayerctl logs``.

Each line is ``<RFC 3339 time> <stdout|stderr> <F|P> <text>``: ``F`` ends a
logical line, ``P`` is a partial chunk continued by the next record of the
same stream. Rotated files sit beside the current one; readers get the list
oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LogLine:
    time: datetime | None
    stream: str  # stdout | stderr
    text: str


def _parse_time(value: str) -> datetime | None:
    # Python's fromisoformat takes at most microseconds; conmon writes nanoseconds.
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits) :]
        value = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_lines(raw: Iterable[str]) -> Iterator[LogLine]:
    """Logical lines from k8s-file records; partial records are joined."""
    pending: dict[str, tuple[datetime | None, list[str]]] = {}
    for record in raw:
        record = record.rstrip("\n")
        parts = record.split(" ", 3)
        if len(parts) < 3:
            continue
        when, stream, tag = parts[0], parts[1], parts[2]
        text = parts[3] if len(parts) == 4 else ""
        started, chunks = pending.pop(stream, (_parse_time(when), []))
        chunks.append(text)
        if tag == "P":
            pending[stream] = (started, chunks)
            continue
        yield LogLine(started, stream, "".join(chunks))
    for stream, (started, chunks) in pending.items():
        yield LogLine(started, stream, "".join(chunks))
