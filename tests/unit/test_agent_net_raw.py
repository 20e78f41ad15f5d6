"""Replicas get no CAP_NET_RAW unless their spec asks for it: with it, a replica
can forge any packet on the node bridge (another replica's address, the node's
127.0.0.0/8)."""

from __future__ import annotations

from typing import Any

import pytest

from daemons.agentd import bundle
from shared.spec import ServiceSpec


def granted(**fields: Any) -> set[str]:
    service = ServiceSpec.model_validate({"image": "app:1", **fields})
    names, _ = bundle.capabilities(service, frozenset(bundle.ALL_CAPS))
    return set(names)


def test_a_replica_gets_no_net_raw_by_default() -> None:
    assert "CAP_NET_RAW" not in granted()
    # The rest of the default set is what ordinary images need.
    assert {"CAP_CHOWN", "CAP_SETUID", "CAP_NET_BIND_SERVICE"} <= granted()


@pytest.mark.parametrize(
    "fields",
    [
        {"capabilities": ["NET_RAW"]},
        {"cap_add": ["CAP_NET_RAW"]},
        {"privileged": True},
    ],
)
def test_a_spec_that_asks_gets_net_raw(fields: dict[str, Any]) -> None:
    assert "CAP_NET_RAW" in granted(**fields)
