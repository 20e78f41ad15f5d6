"""How a WebAssembly replica stopped by one of its limits says so.

agentd words the replica's message from wasmtime's report; schedd makes an
event of every message that starts with :data:`PREFIX`.
"""

from __future__ import annotations

PREFIX = "stopped: the module "


def fuel(amount: int) -> str:
    return f"{PREFIX}used its fuel of {amount}"


def time_limit() -> str:
    return f"{PREFIX}ran past its time limit"


def memory(limit: int) -> str:
    return f"{PREFIX}needs more memory than its max_memory of {limit} bytes"
