"""Adaptive scaling: from cgroup usage and request rates to a replica count.

:func:`decide` is the whole policy, pure and tested alone: for every target
the spec sets (cpu %, memory %, rps per replica) it computes the replica
count that would bring the metric back to its target, takes the largest,
and clamps it to ``min..max``. The scheduler applies a decision only when
the cooldown since the last change has passed, and records every change as
an event with its reason (``scaled web 2 -> 4: rps 1900 > target 800 x 2``).

:class:`Sampler` turns what agentd and proxyd report (cumulative counters)
into rates over the interval between two samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from shared.models import ReplicaStats
from shared.spec.models import AdaptiveScale

# Scale down only when the load would fit in fewer replicas with this much
# headroom, so a service hovering at its target does not flap.
SCALE_DOWN_MARGIN = 0.9


@dataclass(frozen=True)
class Load:
    """A service's load over the last interval; None where not measured."""

    cpu_percent: float | None = None  # mean per replica, of its cpu limit (or one core)
    memory_percent: float | None = None  # mean per replica, of its memory limit
    rps: float | None = None  # requests per second to the whole service


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def decide(current: int, scale: AdaptiveScale, load: Load) -> Decision:
    """The replica count ``load`` calls for, with the reason; ``current`` if none."""
    low, high = scale.min, max(scale.min, scale.max)
    current_or_one = max(current, 1)
    wants: list[tuple[int, str, bool]] = []  # (replicas, reason, over target)
    targets = scale.targets
    if targets.cpu is not None and load.cpu_percent is not None:
        used = load.cpu_percent * current_or_one
        need = math.ceil(used / targets.cpu)
        over = load.cpu_percent > targets.cpu
        wants.append(
            (
                need,
                f"cpu {_fmt(load.cpu_percent)}% {'>' if over else '<'} target {_fmt(targets.cpu)}%",
                over,
            )
        )
    if targets.memory is not None and load.memory_percent is not None:
        used = load.memory_percent * current_or_one
        need = math.ceil(used / targets.memory)
        over = load.memory_percent > targets.memory
        wants.append(
            (
                need,
                f"memory {_fmt(load.memory_percent)}% {'>' if over else '<'} "
                f"target {_fmt(targets.memory)}%",
                over,
            )
        )
    if targets.rps is not None and load.rps is not None:
        need = math.ceil(load.rps / targets.rps)
        over = load.rps > targets.rps * current_or_one
        wants.append(
            (
                need,
                f"rps {_fmt(load.rps)} {'>' if over else '<'} target {targets.rps} x {current}",
                over,
            )
        )
    if current < low:
        return Decision(low, f"below min {low}")
    if current > high:
        return Decision(high, f"above max {high}")
    if not wants:
        return Decision(current, "no load measured")
    above = [w for w in wants if w[2]]
    if above:
        need, reason, _ = max(above)
        return Decision(min(high, max(low, need, current)), reason)
    # Every measured metric is under target: shrink to what fits with headroom.
    need = max(math.ceil(w[0] / SCALE_DOWN_MARGIN) if w[0] else 0 for w in wants)
    need = min(high, max(low, need))
    if need >= current:
        return Decision(current, "within targets")
    return Decision(need, "; ".join(w[1] for w in wants))


@dataclass
class _Counter:
    value: float
    at: float


@dataclass
class Sampler:
    """Rates from cumulative counters, per key."""

    _last: dict[str, _Counter] = field(default_factory=dict)

    def rate(self, key: str, value: float, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        self._last[key] = _Counter(value, now)
        if last is None or now <= last.at or value < last.value:
            return None  # first sample, or the counter was reset (proxyd restarted)
        return (value - last.value) / (now - last.at)

    def forget(self, prefix: str) -> None:
        for key in [k for k in self._last if k.startswith(prefix)]:
            del self._last[key]


def replica_load(stats: list[ReplicaStats], cpu_cores: float | None) -> Load:
    """Mean cpu % (of the cpu limit, or one core) and memory % (of the limit)."""
    if not stats:
        return Load()
    per_core = 100.0 * (cpu_cores or 1.0)
    cpu = sum(s.cpu_percent for s in stats) / len(stats) / per_core * 100.0
    limited = [s for s in stats if s.memory_limit_bytes]
    memory = (
        sum(s.memory_bytes / (s.memory_limit_bytes or 1) for s in limited) / len(limited) * 100.0
        if limited
        else None
    )
    return Load(cpu_percent=cpu, memory_percent=memory)
