"""State files that survive a crash at any moment, and never keep a daemon from starting.

This module owns how ZLayer's daemons write and read the small files they keep
under their state directories (allocations, saved traffic and routes, indexes,
credentials, recorded settings):

- :func:`write_atomically` replaces a file so that a reader, or the next start
  after a crash or a power cut, sees the old content or the new, never a mix:
  a temporary file in the same directory is written, flushed and fsynced,
  renamed over the file, then the directory is fsynced so the rename itself
  is durable. The file's mode is kept (or set), and a temporary file never
  has a looser mode than the file it becomes.
- :func:`read_state` reads and parses one: a file that cannot be read or
  parsed (truncated by a crash of an older writer, wrong schema, garbage) is
  moved aside to ``NAME.corrupt-<timestamp>``, a warning names both paths,
  and the caller gets ``None``, to rebuild from what is actually running
  instead of failing the same way on every restart.
- :func:`move_aside` is that move on its own, for stores that are not read
  through :func:`read_state` (schedd's SQLite database).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEFAULT_MODE = 0o644
TEMP_SUFFIX = ".tmp"
CORRUPT_MARK = ".corrupt-"

_log = logging.getLogger("zlayer.state")


class StateFormatError(ValueError):
    """A state file that parsed but does not hold what it should; the reason, in one sentence."""


def write_atomically(
    path: Path, data: str | bytes, mode: int | None = None, *, durable: bool = True
) -> None:
    """Replace ``path`` with ``data``: the old file or the new one survives a crash, never half.

    ``mode`` is the file's permissions; None keeps those of the file being
    replaced (0644 for a new one). The parent directory is created if needed.

    ``durable=False`` skips both fsyncs (each costs milliseconds, tens on a
    busy disk): the rename is still atomic, so readers and a restart after a
    daemon crash see the old content or the new, never a mix; only a power cut
    or kernel crash may lose the last writes (an empty file is moved aside by
    :func:`read_state`). For files that describe what runs on this node, which
    a power cut takes with it, and that the owner rebuilds from what it finds.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = DEFAULT_MODE
    temp = directory / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    # Created 0600 and widened only once written: a secret never sits in a
    # file others can read, not even for a moment.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make the renames and removals in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(
    path: Path,
    parse: Callable[[str], T],
    then: str = "starting without it",
    log: logging.Logger | None = None,
) -> T | None:
    """``parse`` of the file's text; None if there is no file or it could not be used.

    ``parse`` raises ValueError (a JSON or pydantic error is one;
    :class:`StateFormatError` for a wrong schema), KeyError, TypeError or
    AttributeError for content it cannot use. Such a file, or one that
    cannot be read, is moved aside and logged as a warning with ``then``
    (what the caller does instead, e.g. "rebuilding the allocations from the
    attachments on this node"); None is returned.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        reason = exc.strerror or str(exc)
    else:
        try:
            return parse(raw.decode())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = _one_line(exc) if raw.strip() else "it is empty"
    logger = log or _log
    try:
        aside = move_aside(path)
    except OSError as exc:
        logger.warning(
            "%s cannot be used (%s) and cannot be moved aside (%s); %s, the next write replaces it",
            path,
            reason,
            exc.strerror or exc,
            then,
        )
        return None
    logger.warning("%s cannot be used (%s); moved it to %s, %s", path, reason, aside, then)
    return None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``NAME.corrupt-<UTC timestamp>`` beside it; the new path.

    An earlier copy of the same second is never replaced (``.2``, ``.3``, ...).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}.{n}")
    os.rename(path, aside)
    fsync_directory(path.parent)
    return aside


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the temporary files writers of ``path`` left when they died; what was removed.

    ``path`` is a state file, or a directory of them (every writer's leftovers
    in it). Only for a start, before anything writes there: a write in flight
    has one of these too.
    """
    directory, pattern = (path, f".*{TEMP_SUFFIX}")
    if not path.is_dir():
        directory, pattern = (path.parent, f".{path.name}.*{TEMP_SUFFIX}")
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for temp in directory.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    return removed


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "") if text else type(exc).__name__
