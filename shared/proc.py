"""Whether a process runs, read from /proc: no signal is sent, and a zombie (ended, its
exit not yet collected by its parent) counts as ended, where ``os.kill(pid, 0)``
would still succeed on it."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            # the state follows the command's name, in parentheses that may hold ") "
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False
