"""A replica run by crun has no CAP_NET_RAW unless its spec asks for it: it cannot
open a raw socket (so cannot forge packets on the node bridge), and ping fails."""

from __future__ import annotations

import asyncio

from tests.integration.test_agent_runtime import (  # noqa: F401 (fixtures)
    Harness,
    busybox_rootfs,
    rt,
    run_to_end,
    sh,
)

NET_RAW = 1 << 13
# A raw ICMP socket needs CAP_NET_RAW; busybox ping opens one.
PROBE = (
    "grep CapEff /proc/self/status; busybox ping -c1 -W1 127.0.0.1 >/dev/null 2>&1; echo ping=$?"
)


def cap_eff(text: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith("CapEff"))
    return int(line.split()[1], 16)


def test_a_replica_has_no_net_raw_unless_its_spec_asks(rt: Harness) -> None:  # noqa: F811
    async def scenario() -> tuple[str, str]:
        runtime = await rt.ready()
        _, _, default = await run_to_end(runtime, rt.rootfs, "t-noraw", sh(PROBE))
        _, _, asked = await run_to_end(
            runtime, rt.rootfs, "t-raw", sh(PROBE, capabilities=["NET_RAW"])
        )
        return default, asked

    default, asked = asyncio.run(scenario())
    assert not cap_eff(default) & NET_RAW and default.endswith("ping=1"), default
    assert cap_eff(asked) & NET_RAW and asked.endswith("ping=0"), asked
