"""The cluster's replica range cut into one block per node, and its etcd voters, over etcd.

``node init`` writes the cluster's :class:`~shared.wire.cluster.ClusterSettings`
once (``KEYS["cluster"]``): the range (the first node's overlayd subnet, or
``--cluster-subnet``), the block size and how many nodes are etcd voters.
Each node holds one block: ``KEYS["subnets"] + "<block>"`` names its node id.
A block is taken in one transaction that holds only while its key does not
exist, so two nodes never hold the same block, whatever the race; a node that
already holds one keeps it (a restart, or the join asked again). ``node rm``
releases the removed node's block.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from shared.wire import WireError, decode, encode
from shared.wire.cluster import KEYS, ClusterSettings

DEFAULT_BLOCK_PREFIX = 24
DEFAULT_VOTERS = 3
MAX_VOTERS = 7
MAX_BLOCK_PREFIX = 30  # overlayd needs room for a gateway and a replica
TRIES = 20  # allocation races lost before giving up


class BlocksError(ValueError):
    """Cluster settings that cannot be used, or no block left, in one sentence."""


# ------------------------------------------------------------ pure


def make_settings(
    subnet: str, block_prefix: int = DEFAULT_BLOCK_PREFIX, voters: int = DEFAULT_VOTERS
) -> ClusterSettings:
    """Checked cluster settings; :class:`BlocksError` says what is wrong."""
    try:
        network = IPv4Network(subnet.strip())
    except ValueError:
        raise BlocksError(
            f"{subnet!r} is not an IPv4 subnet; write the cluster subnet as 10.213.0.0/16"
        ) from None
    if not network.prefixlen < block_prefix <= MAX_BLOCK_PREFIX:
        raise BlocksError(
            f"the cluster subnet {network} has no room for blocks of /{block_prefix} (one a "
            f"node); give a larger subnet (at most /{MAX_BLOCK_PREFIX - 1}) with --cluster-subnet"
        )
    if voters < 1 or voters > MAX_VOTERS or voters % 2 == 0:
        raise BlocksError(
            f"{voters} etcd voters cannot be: give an odd number up to {MAX_VOTERS} (3, 5 or 7)"
        )
    return ClusterSettings(subnet=str(network), block_prefix=block_prefix, voters=voters)


def blocks(settings: ClusterSettings) -> Iterable[IPv4Network]:
    """Every block of the range, lowest first."""
    return IPv4Network(settings.subnet).subnets(new_prefix=settings.block_prefix)


def handed_out(settings: ClusterSettings) -> Iterable[IPv4Network]:
    """The blocks in the order they are handed out: the lowest first, but the first
    block last. The range is mostly every lone node's overlayd subnet, whose gateway
    (the range's first address) each joining node's bridge had: no node's gateway
    should be an address the others may still hold."""
    every = iter(blocks(settings))
    first = next(every)
    yield from every
    yield first


def first_free(settings: ClusterSettings, used: Iterable[str]) -> str | None:
    """The next block to hand out that no node holds, None when all are held."""
    taken = set(used)
    for block in handed_out(settings):
        if str(block) not in taken:
            return str(block)
    return None


def block_of(settings: ClusterSettings, address: str) -> str | None:
    """The block of the range that ``address`` is in (the first node's gateway, when it
    runs replicas: they keep their addresses); None when it is outside the range."""
    network = IPv4Network(settings.subnet)
    found = IPv4Network(f"{address}/{settings.block_prefix}", strict=False)
    return str(found) if found.subnet_of(network) else None


def is_voter(members: int, settings: ClusterSettings | None) -> bool:
    """Whether a node joining a cluster of ``members`` etcd members becomes one."""
    voters = settings.voters if settings is not None else DEFAULT_VOTERS
    return members < voters


@dataclass(frozen=True)
class InitOptions:
    """``node init``'s options, which cross Scheduler1.NodeInit's one string argument:
    the address alone, or a JSON object when an option is given (:func:`init_argument`)."""

    advertise: str = ""
    cluster_subnet: str = ""  # "" takes overlayd's subnet
    etcd_voters: int = DEFAULT_VOTERS


def init_argument(advertise: str, cluster_subnet: str = "", etcd_voters: int = 0) -> str:
    """What ``zlayerctl node init`` sends: the address alone when no option is given."""
    if not cluster_subnet and not etcd_voters:
        return advertise
    wanted: dict[str, object] = {"advertise": advertise, "cluster_subnet": cluster_subnet}
    if etcd_voters:
        wanted["etcd_voters"] = etcd_voters
    return json.dumps(wanted)


def parse_init(text: str) -> InitOptions:
    """NodeInit's argument, read; :class:`BlocksError` when it is neither form."""
    if not text.lstrip().startswith("{"):
        return InitOptions(advertise=text)
    try:
        found = json.loads(text)
        return InitOptions(
            advertise=str(found.get("advertise", "")),
            cluster_subnet=str(found.get("cluster_subnet", "")),
            etcd_voters=int(found.get("etcd_voters", DEFAULT_VOTERS)),
        )
    except (ValueError, TypeError, AttributeError):
        raise BlocksError(
            "node init's options do not read; run zlayerctl node init again"
        ) from None


# ------------------------------------------------------------ over etcd


def _key(block: str) -> bytes:
    return (KEYS["subnets"] + block).encode()


async def load_settings(client: Any) -> ClusterSettings | None:
    """The cluster's settings; None in a cluster made before they were kept."""
    found = await client.get(KEYS["cluster"].encode())
    if found is None:
        return None
    try:
        return decode(found.value, ClusterSettings)
    except WireError:
        return None


async def save_settings(client: Any, settings: ClusterSettings) -> ClusterSettings:
    """Write the settings unless some are there already; the settings in force."""
    key = KEYS["cluster"].encode()
    tx = client.transactions
    ok, responses = await client.transaction(
        compare=[tx.create(key) == 0],
        success=[tx.put(key, encode(settings).encode())],
        failure=[tx.get(key)],
    )
    if ok:
        return settings
    return decode(responses[0][0][0], ClusterSettings)


async def held(client: Any) -> dict[str, str]:
    """Every block held, to its node id."""
    prefix = KEYS["subnets"]
    return {
        kv.key.decode()[len(prefix) :]: kv.value.decode()
        for kv in await client.get_prefix(prefix.encode())
    }


async def allocate(
    client: Any, settings: ClusterSettings, node_id: str, prefer: str | None = None
) -> str:
    """``node_id``'s block: the one it holds, else ``prefer`` if free, else the next free
    one (:func:`handed_out`), taken in a transaction that fails if another node took it
    first (then the next is tried). :class:`BlocksError` when every block is held."""
    tx = client.transactions
    for _ in range(TRIES):
        holders = await held(client)
        mine = sorted(block for block, node in holders.items() if node == node_id)
        if mine:
            return mine[0]
        block = prefer if prefer is not None and prefer not in holders else None
        block = block or first_free(settings, holders)
        if block is None:
            raise BlocksError(
                f"every block of the cluster subnet {settings.subnet} is held by a node; "
                "remove a node (zlayerctl node rm) to free one"
            )
        key = _key(block)
        ok, _ = await client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, node_id.encode())], failure=[]
        )
        if ok:
            return block
    raise BlocksError("other nodes kept taking the free blocks; try the join again")


async def release(client: Any, node_id: str) -> list[str]:
    """Free every block ``node_id`` holds; the blocks freed. Each delete holds only while
    the key still names that node."""
    tx = client.transactions
    freed: list[str] = []
    for block, node in (await held(client)).items():
        if node != node_id:
            continue
        key = _key(block)
        ok, _ = await client.transaction(
            compare=[tx.value(key) == node_id.encode()], success=[tx.delete(key)], failure=[]
        )
        if ok:
            freed.append(block)
    return freed
