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
from typing import TYPE_CHECKING

from shared.wire.agent import ReplicaStats

if TYPE_CHECKING:
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
    if current < low:
        return Decision(low, f"below min {low}")
    if current > high:
        return Decision(high, f"above max {high}")
    # (work to place, what one replica should carry, the reason, over target)
    measures: list[tuple[float, float, str, bool]] = []
    targets = scale.targets
    replicas = max(current, 1)
    if targets.cpu is not None and load.cpu_percent is not None:
        over = load.cpu_percent > targets.cpu
        sign = ">" if over else "<"
        reason = f"cpu {_fmt(load.cpu_percent)}% {sign} target {_fmt(targets.cpu)}%"
        measures.append((load.cpu_percent * replicas, targets.cpu, reason, over))
    if targets.memory is not None and load.memory_percent is not None:
        over = load.memory_percent > targets.memory
        sign = ">" if over else "<"
        reason = f"memory {_fmt(load.memory_percent)}% {sign} target {_fmt(targets.memory)}%"
        measures.append((load.memory_percent * replicas, targets.memory, reason, over))
    if targets.rps is not None and load.rps is not None:
        over = load.rps > targets.rps * replicas
        sign = ">" if over else "<"
        reason = f"rps {_fmt(load.rps)} {sign} target {targets.rps} x {current}"
        measures.append((load.rps, float(targets.rps), reason, over))
    if not measures:
        return Decision(current, "no load measured")
    above = [m for m in measures if m[3]]
    if above:
        need, reason = max((math.ceil(work / capacity), why) for work, capacity, why, _ in above)
        return Decision(min(high, max(low, need, current)), reason)
    # Every measured metric is under target: shrink to what fits with headroom.
    need = max(
        math.ceil(work / (capacity * SCALE_DOWN_MARGIN)) for work, capacity, _, _ in measures
    )
    need = min(high, max(low, need))
    if need >= current:
        return Decision(current, "within targets")
    return Decision(need, "; ".join(m[2] for m in measures))


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
