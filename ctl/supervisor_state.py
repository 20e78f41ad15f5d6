"""The built-in supervisor's record of itself and its children (``supervisor.json``).

Apart from ``ctl.supervisor`` so that ``zlayerctl status`` reads it without
the supervisor's imports (asyncio, sdbus); ``ctl.supervisor`` re-exports it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import msgspec

from shared.busread import PREFIX_ENV  # as shared.paths, without its pathlib
from shared.proc import alive

if TYPE_CHECKING:
    from shared.paths import Paths


class ChildState(msgspec.Struct, kw_only=True):
    """One supervised daemon, as written to supervisor.json."""

    name: str
    pid: int = 0
    state: str = "starting"  # starting | running | restarting | stopped | failed
    restarts: int = 0
    last_exit: int | None = None
    next_start_at: float | None = None
    log_file: str = ""
    fd_store: list[str] = []  # names of the descriptors it keeps with us


class SupervisorState(msgspec.Struct, kw_only=True):
    """The supervisor's record of itself and its children."""

    pid: int
    started_at: float
    bus_address: str
    bus_pid: int
    ready: bool = False
    daemons: dict[str, ChildState]

    @classmethod
    def read(cls, paths: Paths) -> SupervisorState | None:
        """The running supervisor's state, or None when none runs."""
        return cls.read_file(str(paths.supervisor_state))

    @classmethod
    def read_file(cls, path: str) -> SupervisorState | None:
        """The state in ``path`` if its supervisor runs, else None."""
        try:
            with open(path, "rb") as handle:
                state = msgspec.json.decode(handle.read(), type=cls)
        except (OSError, ValueError, msgspec.DecodeError):
            return None
        return state if alive(state.pid) else None


def state_file(environ: dict[str, str] | None = None) -> str:
    """``Paths.from_env().supervisor_state``, without pathlib."""
    env = os.environ if environ is None else environ
    return os.path.join(env.get(PREFIX_ENV) or "/", "run", "zlayer", "supervisor.json")
