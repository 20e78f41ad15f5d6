"""A node's block of the cluster's replica range, at ``node init`` and ``node join``.

- ``node init`` takes the cluster's range from ``--cluster-subnet`` or overlayd's
  subnet, and its own block: the first one handed out
  (:func:`shared.cluster.blocks.handed_out`), or, where it runs replicas, the one
  its gateway is in, so they keep their addresses (a replica outside it refuses
  the init with a sentence).
- ``node join`` refuses a node whose network has replicas attached (it moves to
  another block: they would lose their addresses), then takes the lowest free block.
- Either way the block goes into cluster.toml, and overlayd, which takes it for its
  subnet, is started again and waited for; proxyd too when the gateway moved,
  since its internal endpoints listen on the gateway's address. Under ``zlayerctl
  daemon run`` the supervisor starts a daemon again when it ends, so it is sent
  SIGTERM; under systemd the units are restarted.

``node init`` passes its options through Scheduler1.NodeInit's one argument: a
plain address (or ""), or a JSON object (:func:`shared.cluster.blocks.init_argument`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, TypeVar

from shared.bus import InvalidArgumentError, UnavailableError, ZLayerError
from shared.cluster import blocks
from shared.cluster.etcd import TLSFiles, client
from shared.daemon import SUPERVISOR_ENV
from shared.logs import under_systemd
from shared.wire.cluster import ClusterSettings

if TYPE_CHECKING:
    from shared.clients import OverlayClient
    from shared.paths import Paths

log = logging.getLogger("zlayer.schedd.cluster")

T = TypeVar("T")
MOVE_TIMEOUT = 60.0  # seconds for overlayd to come back on the node's block
CALL_TIMEOUT = 5.0


def parse_init(text: str) -> blocks.InitOptions:
    """NodeInit's argument, read; InvalidArgumentError when it is neither form."""
    try:
        return blocks.parse_init(text)
    except blocks.BlocksError as exc:
        raise InvalidArgumentError(str(exc)) from None


async def ask(call: Awaitable[T]) -> T:
    """An answer of overlayd's, or the sentence that says it gives none."""
    try:
        return await asyncio.wait_for(call, CALL_TIMEOUT)
    except ZLayerError:
        raise
    except Exception as exc:
        raise UnavailableError(
            f"zlayer-overlayd does not answer ({exc or type(exc).__name__}); the node's "
            "network must move to its block of the cluster: start it, then try again"
        ) from None


@dataclass(frozen=True)
class InitPlan:
    settings: ClusterSettings
    block: str  # the first node's


async def plan_init(overlay: OverlayClient, options: blocks.InitOptions) -> InitPlan:
    """The cluster's settings and this node's block; refused with a sentence when the
    options do not fit or a replica here is outside the block."""
    network = await ask(overlay.get_network())
    try:
        settings = blocks.make_settings(
            options.cluster_subnet or network.subnet, voters=options.etcd_voters
        )
    except blocks.BlocksError as exc:
        raise InvalidArgumentError(str(exc)) from None
    attached = await ask(overlay.list_attachments())
    # with replicas, the block they are in, if one is: they keep their addresses
    block = blocks.block_of(settings, network.gateway) if attached else None
    block = block or blocks.first_free(settings, [])
    assert block is not None  # a range has two blocks at least
    inside = IPv4Network(block)
    outside = sorted(a.address for a in attached if IPv4Address(a.address) not in inside)
    if outside:
        raise InvalidArgumentError(
            f"replicas of this node have addresses outside its block {block} of the cluster "
            f"subnet ({', '.join(outside[:3])}); stop them (zlayerctl down) or choose "
            "another --cluster-subnet, then run node init again"
        )
    return InitPlan(settings, block)


async def refuse_replicas(overlay: OverlayClient) -> None:
    """A joining node moves its network to a block of the cluster's: none may be attached."""
    attached = await ask(overlay.list_attachments())
    if attached:
        raise InvalidArgumentError(
            f"this node runs {len(attached)} replica{'s' if len(attached) != 1 else ''} on its "
            "network, which moves to the cluster's block when it joins: remove them "
            "(zlayerctl down) first"
        )


async def record_init(endpoints: list[str], tls: TLSFiles, node_id: str, plan: InitPlan) -> None:
    """The new cluster's settings, and this node's block held in its name."""
    async with client(endpoints, tls, CALL_TIMEOUT) as etcd:
        await blocks.save_settings(etcd, plan.settings)
        got = await blocks.allocate(etcd, plan.settings, node_id, prefer=plan.block)
    if got != plan.block:  # a fresh cluster holds no block: cannot happen
        raise UnavailableError(f"this node's block {plan.block} is another node's; init again")


async def join_block(endpoints: list[str], tls: TLSFiles, node_id: str) -> str:
    """The lowest free block, taken for ``node_id``; "" in a cluster made before blocks
    were handed out (its nodes keep their own subnets)."""
    async with client(endpoints, tls, CALL_TIMEOUT) as etcd:
        settings = await blocks.load_settings(etcd)
        if settings is None:
            return ""
        try:
            return await blocks.allocate(etcd, settings, node_id)
        except blocks.BlocksError as exc:
            raise InvalidArgumentError(str(exc)) from None


async def release_block(endpoints: list[str], tls: TLSFiles, node_id: str) -> None:
    """A failed join gives its block back (best effort: etcd may be what failed)."""
    with contextlib.suppress(Exception):
        async with client(endpoints, tls, CALL_TIMEOUT) as etcd:
            await blocks.release(etcd, node_id)


# ------------------------------------------------------------ moving the node's network


async def restart(paths: Paths, daemons: list[str]) -> None:
    """Have ``daemons`` (short names: "overlayd") start again, to read their settings."""
    if os.environ.get(SUPERVISOR_ENV):
        from ctl.supervisor_state import SupervisorState

        state = await asyncio.to_thread(SupervisorState.read, paths)
        for name in daemons:
            child = state.daemons.get(name) if state is not None else None
            if child is not None and child.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)  # the supervisor starts it again
        return
    if under_systemd():
        units = [f"zlayer-{name}.service" for name in daemons]
        process = await asyncio.create_subprocess_exec(
            "systemctl",
            "restart",
            "--no-block",
            *units,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, error = await process.communicate()
        if process.returncode != 0:
            log.warning("systemctl restart %s failed: %s", " ".join(units), error.decode().strip())
        return
    log.warning(
        "schedd runs under neither systemd nor zlayerctl daemon run: restart %s yourself "
        "so they take this node's block",
        ", ".join(f"zlayer-{name}" for name in daemons),
    )


async def move_network(paths: Paths, overlay: OverlayClient, block: str) -> None:
    """Restart overlayd (and proxyd, if the gateway moves) on ``block``, and wait until
    overlayd says it is there; a warning (not a failure) if it is not in time: the
    node's placement waits for it before claiming the block."""
    network = await ask(overlay.get_network())
    if network.subnet == block:
        return
    wanted = IPv4Network(block)
    moved_gateway = network.gateway != str(wanted.network_address + 1)
    await restart(paths, ["overlayd", "proxyd"] if moved_gateway else ["overlayd"])
    deadline = time.monotonic() + MOVE_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # restarting: not on the bus for a moment
            network = await asyncio.wait_for(overlay.get_network(), CALL_TIMEOUT)
            if network.subnet == block:
                log.info("this node's replicas' network moved to its block %s", block)
                return
        await asyncio.sleep(0.5)
    log.warning(
        "zlayer-overlayd has not taken this node's block %s within %.0f s (its subnet is %s); "
        "restart it",
        block,
        MOVE_TIMEOUT,
        network.subnet,
    )


async def member_endpoints(etcd: object) -> list[str]:
    """Every etcd member's client URLs, as the members say them."""
    urls: list[str] = []
    async for member in etcd.members():  # type: ignore[attr-defined]
        urls += [u for u in member.client_urls if u not in urls]
    return urls
