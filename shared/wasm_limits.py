"""WebAssembly limits: how a replica stopped by one of them says so, and which of
the spec's settings wasmtime's command line can honour.

agentd words the replica's message from wasmtime's report; schedd makes an
event of every message that starts with :data:`PREFIX`. The spec checks
(``shared.spec.support``) and agentd share the sentences that refuse a setting.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.spec import ServiceSpec

PREFIX = "stopped: the module "
# How often ``wasmtime serve`` ticks its epoch when requests have a time limit: at each
# tick a running request yields to the others (and its time limit is checked). Fixed
# by the command line (EPOCH_INTERRUPT_PERIOD in its serve command), or the time
# limit itself when that is shorter.
SERVE_EPOCH_TICK = timedelta(milliseconds=50)


def fuel(amount: int) -> str:
    return f"{PREFIX}used its fuel of {amount}"


def time_limit() -> str:
    return f"{PREFIX}ran past its time limit"


def memory(limit: int) -> str:
    return f"{PREFIX}needs more memory than its max_memory of {limit} bytes"


def serve_epoch_tick(request_timeout: timedelta) -> timedelta:
    """How often a request under ``wasmtime serve -W timeout=`` yields to the others."""
    return min(SERVE_EPOCH_TICK, request_timeout)


def epoch_interval_refusal(spec: ServiceSpec) -> str:
    """Why ``wasm.epoch_interval`` cannot be honoured for this service; empty when it is.

    The interval is the longest a request runs before yielding to the others.
    ``wasmtime serve`` yields at every tick of its epoch, so any interval no shorter
    than that tick is met; ``wasmtime run`` has no ticks to set (a command runs alone,
    and its epoch moves only when a time limit ends it).
    """
    from shared.spec.quantities import format_duration

    settings = spec.wasm
    if settings is None or settings.epoch_interval is None:
        return ""
    if spec.service_type != "wasm_http":
        return (
            "wasm.epoch_interval is how often a wasi:http request yields to the others, and "
            "a WASI command runs alone under wasmtime run, which has no epoch ticks to set; "
            "remove it and bound the module's work with max_fuel"
        )
    tick = serve_epoch_tick(settings.request_timeout)
    if settings.epoch_interval < tick:
        return (
            f"wasm.epoch_interval {format_duration(settings.epoch_interval)} is shorter than "
            f"wasmtime serve's epoch tick of {format_duration(tick)} (its command line has no "
            f"setting for it); remove it or make it {format_duration(tick)} or more"
        )
    return ""


def command_check_refusal(spec: ServiceSpec) -> str:
    """Why a command health check cannot run in a WebAssembly replica; empty if none
    (a job's or cron job's checks never run)."""
    if spec.rtype != "service" or spec.health.check.type != "command":
        return ""
    return (
        "a command health check cannot run in a WebAssembly replica (its root holds the "
        "module and wasmtime, with no commands to run); use an http or tcp check"
    )
