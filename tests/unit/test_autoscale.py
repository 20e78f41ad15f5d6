"""The adaptive scaling policy: the replica count load calls for, and why."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from daemons.schedd.autoscale import Load, Sampler, decide, replica_load
from shared.spec.models import AdaptiveScale, ScaleTargets
from shared.wire.agent import ReplicaStats


def scale(**targets: float) -> AdaptiveScale:
    return AdaptiveScale(
        min=1, max=8, cooldown=timedelta(seconds=30), targets=ScaleTargets.model_validate(targets)
    )


def test_rps_over_target_scales_up_with_the_reason() -> None:
    decision = decide(2, scale(rps=800), Load(rps=1900))
    assert decision.replicas == 3  # ceil(1900 / 800)
    assert decision.reason == "rps 1900 > target 800 x 2"


def test_cpu_over_target_scales_to_what_brings_it_back() -> None:
    decision = decide(2, scale(cpu=50), Load(cpu_percent=90))
    assert decision.replicas == 4  # 180% of work at 50% each
    assert decision.reason.startswith("cpu 90% > target 50%")


def test_the_largest_need_wins_and_max_caps_it() -> None:
    decision = decide(2, scale(cpu=50, rps=100), Load(cpu_percent=60, rps=5000))
    assert decision.replicas == 8
    assert "rps" in decision.reason


def test_idle_scales_down_to_min() -> None:
    decision = decide(6, scale(cpu=50, rps=100), Load(cpu_percent=0.5, rps=0))
    assert decision.replicas == 1
    assert "cpu" in decision.reason and "rps" in decision.reason


def test_near_target_holds_rather_than_flapping() -> None:
    assert decide(4, scale(cpu=50), Load(cpu_percent=47)).replicas == 4


def test_without_measurements_nothing_changes() -> None:
    assert decide(3, scale(rps=100), Load()).replicas == 3
    assert decide(3, scale(), Load(cpu_percent=99)).replicas == 3


def test_bounds_are_restored_first() -> None:
    assert decide(0, scale(cpu=50), Load()).replicas == 1
    assert decide(12, scale(cpu=50), Load()).replicas == 8


@given(
    current=st.integers(0, 20),
    cpu=st.none() | st.floats(0, 400),
    rps=st.none() | st.floats(0, 10**6),
)
def test_a_decision_is_always_within_bounds(
    current: int, cpu: float | None, rps: float | None
) -> None:
    decision = decide(current, scale(cpu=60, rps=500), Load(cpu_percent=cpu, rps=rps))
    assert 1 <= decision.replicas <= 8
    assert decision.reason


def test_sampler_rates_and_counter_resets() -> None:
    sampler = Sampler()
    assert sampler.rate("web", 100, now=10.0) is None
    assert sampler.rate("web", 400, now=13.0) == 100.0
    assert sampler.rate("web", 50, now=14.0) is None  # proxyd restarted: counter went back


def test_replica_load_is_relative_to_the_cpu_limit_and_memory_limit() -> None:
    stats = [
        ReplicaStats(
            id="a",
            cpu_usage_usec=0,
            cpu_percent=50,
            memory_bytes=50,
            memory_limit_bytes=100,
            pids=1,
            pids_limit=None,
        ),
        ReplicaStats(
            id="b",
            cpu_usage_usec=0,
            cpu_percent=30,
            memory_bytes=10,
            memory_limit_bytes=100,
            pids=1,
            pids_limit=None,
        ),
    ]
    load = replica_load(stats, 0.5)
    assert load.cpu_percent == 80.0  # 40% of a core is 80% of half a core
    assert load.memory_percent == 30.0
