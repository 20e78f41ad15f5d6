"""This node in its cluster: its record under a lease, the live node set, one leader.

- The node's :class:`NodeRecord` lives at ``/zlayer/nodes/<id>`` bound to a
  lease of ``ttl`` seconds (5 by default) that is refreshed every quarter of it
  (and again soon after a refresh fails).
  A node that dies stops refreshing; etcd drops the lease and the record with
  it, and every other node's watch sees the node go, within ``ttl``.
- :attr:`Membership.nodes` is the live node set: one read of the prefix, then a
  watch from the revision after it (read again whenever the watch breaks).
- Election: a transaction creates ``/zlayer/leader`` (this node's id) bound to
  the same lease if no one holds it; the holder places replicas. The others
  watch the key and stand again when it goes, which is at the latest when the
  holder's lease lapses.
- A leader steps down at once when it can no longer be sure of its lease: etcd
  says the lease is gone, or no refresh has been confirmed for most of the
  lease's time (etcd unreachable), so it stops leading before the lease can
  lapse and another node take over. It then takes a new lease, writes its
  record again and stands again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aetcd  # type: ignore[import-untyped]

from shared.bus import UnavailableError
from shared.cluster.etcd import TLSFiles, client, retrying
from shared.tasks import cancel_all
from shared.wire import WireError, decode, encode
from shared.wire.cluster import KEYS, NodeRecord

log = logging.getLogger(__name__)

DEFAULT_TTL = 5  # seconds: a dead node's record, and its leadership, go within this
RETRY = 0.5  # seconds between tries while etcd does not answer
# What etcd or the connection to it may raise while a member is away.
ETCD_ERRORS = (aetcd.ClientError, OSError, TimeoutError)


def _node_key(node_id: str) -> bytes:
    return (KEYS["nodes"] + node_id).encode()


def _prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


class Membership:
    """This node's record kept alive in etcd, the cluster's live nodes, and whether it leads.

    ``on_change`` is called (on the event loop) after the node set or the
    leadership changed; :attr:`changed` is also set then, for a waiter.
    """

    def __init__(
        self,
        record: NodeRecord,
        endpoints: Sequence[str],
        tls: TLSFiles | None = None,
        *,
        ttl: int = DEFAULT_TTL,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"a lease of {ttl} s is too short: give at least 2 s")
        self.record = record
        self.endpoints = list(endpoints)
        self.ttl = ttl
        # Each call is bounded well inside the lease, so a hung call cannot
        # keep the node believing in a lease that is gone.
        self._client = client(self.endpoints, tls, timeout=max(1.0, ttl / 3))
        self._on_change = on_change
        self.changed = asyncio.Event()
        self.nodes: dict[str, NodeRecord] = {}
        self.leader: str | None = None  # the holder of the election key, as last seen
        self.is_leader = False
        self.lease: int | None = None  # the lease this node's keys are bound to now
        self._registered = asyncio.Event()
        self._deadline: asyncio.TimerHandle | None = None
        # When the lease lapses unless a refresh is confirmed first: the node fences itself.
        self._lapse: asyncio.TimerHandle | None = None
        self.fenced = False  # cut off from etcd for longer than the lease: it owns nothing
        self._stale: int | None = None  # a lost lease etcd may still hold: revoked when it can be
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ life

    async def start(self, timeout: float = 10.0) -> None:
        """Write this node's record under a new lease and start keeping it, watching
        the nodes and standing for leader; UnavailableError when etcd does not
        answer within ``timeout`` seconds."""
        try:
            await retrying(self._register, timeout)
        except ETCD_ERRORS as exc:
            await self._client.close()
            raise UnavailableError(
                f"the cluster's store (etcd at {', '.join(self.endpoints)}) does not answer: "
                f"{exc or type(exc).__name__}; check that etcd runs and that this node reaches it"
            ) from None
        for work in (self._keep, self._watch_nodes, self._elect):
            self._tasks.append(asyncio.create_task(work(), name=f"membership-{work.__name__}"))

    async def stop(self) -> None:
        """Leave: stop leading, revoke the lease (the record and the election key
        go at once, so another node leads without waiting for it to lapse)."""
        await cancel_all(self._tasks)
        for timer in (self._deadline, self._lapse):
            if timer is not None:
                timer.cancel()
        leases = {self.lease, self._stale} - {None}
        self.lease = self._stale = None
        self.is_leader = False
        for lease in leases:
            with contextlib.suppress(*ETCD_ERRORS):
                await self._client.revoke_lease(lease)
        await self._client.close()

    async def update(self, record: NodeRecord) -> None:
        """Publish a changed record of this node (labels, state) under the same lease."""
        self.record = record
        if self.lease is not None:
            await self._client.put(_node_key(record.id), encode(record).encode(), lease=self.lease)

    # ------------------------------------------------------------ the lease

    async def _register(self) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        granted = await self._client.lease(self.ttl)
        try:
            await self._client.put(
                _node_key(self.record.id), encode(self.record).encode(), lease=granted.id
            )
        except BaseException:
            with contextlib.suppress(*ETCD_ERRORS):
                await self._client.revoke_lease(granted.id)
            raise
        self.lease = granted.id
        self._arm(sent + granted.ttl)
        self._registered.set()
        if self.fenced:
            self.fenced = False
            log.info("node %s reaches etcd again with a new lease", self.record.id)
            self._notify()
        log.info("node %s is in the cluster (lease %x, %s s)", self.record.id, granted.id, self.ttl)

    def _arm(self, lapses_at: float) -> None:
        """Step down a margin before the lease could lapse, unless a refresh comes first."""
        if self._deadline is not None:
            self._deadline.cancel()
        margin = min(1.0, self.ttl * 0.2)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_at(
            lapses_at - margin, self._lost, "no refresh of the lease was confirmed in time"
        )
        # Unlike the deadline, a loss does not cancel this: only a confirmed refresh or a
        # new lease does.
        if self._lapse is not None:
            self._lapse.cancel()
        self._lapse = loop.call_at(lapses_at, self._fence)

    def _fence(self) -> None:
        """No refresh confirmed for the lease's whole time: it has lapsed (or is about to)
        and the others move this node's replicas; the node stops running them."""
        self._lapse = None
        if self.fenced:
            return
        self._lost("etcd did not answer for the lease's whole time")
        self.fenced = True
        log.warning(
            "node %s has not reached etcd for %s s, longer than its lease: it stops its "
            "replicas until it is back in the cluster",
            self.record.id,
            self.ttl,
        )
        self._notify()

    def _lost(self, why: str) -> None:
        """The lease can no longer be counted on: stop leading now, register again later."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.lease is None:
            return
        log.warning("node %s lost its lease %x: %s", self.record.id, self.lease, why)
        self._stale, self.lease = self.lease, None
        self._registered.clear()
        if self.is_leader:
            self.is_leader = False
            self._notify()

    async def _keep(self) -> None:
        """Refresh the lease every quarter of its time, and again soon after a refresh
        that failed (an etcd election holds answers for a second or two); after a loss,
        register anew."""
        loop = asyncio.get_running_loop()
        delay = self.ttl / 4
        while True:
            await asyncio.sleep(delay)
            delay = self.ttl / 4
            lease = self.lease
            if lease is None:
                try:
                    if self._stale is not None:
                        # Its keys (the election key among them) go now, not when it
                        # lapses; unrefreshed, it lapses anyway if this fails.
                        stale, self._stale = self._stale, None
                        with contextlib.suppress(*ETCD_ERRORS):
                            await self._client.revoke_lease(stale)
                    await self._register()
                except ETCD_ERRORS as exc:
                    log.warning("node %s cannot register again yet: %s", self.record.id, exc)
                continue
            sent = loop.time()
            try:
                reply = await self._client.refresh_lease(lease)
            except ETCD_ERRORS as exc:
                log.warning("refreshing lease %x failed: %s", lease, exc)
                # A whole period after a try that took its whole time (a third of the
                # lease) came past the step-down: one refresh lost to an election lost it.
                delay = RETRY
                continue  # the deadline steps down if this goes on
            if lease != self.lease:
                continue  # lost meanwhile
            if reply is None or reply.TTL <= 0:
                self._lost("etcd says the lease is gone")
                self._stale = None
                continue
            self._arm(sent + reply.TTL)

    # ------------------------------------------------------------ the nodes

    async def _watch_nodes(self) -> None:
        prefix = KEYS["nodes"].encode()
        while True:
            try:
                listed = await self._client.get_prefix(prefix)
                nodes: dict[str, NodeRecord] = {}
                for kv in listed:
                    record = self._record(kv.value)
                    if record is not None:
                        nodes[record.id] = record
                self.nodes = nodes
                self._notify()
                async for event in self._events(prefix, listed.header.revision + 1):
                    node_id = event.kv.key[len(prefix) :].decode()
                    if event.kind == "DELETE":
                        if self.nodes.pop(node_id, None) is not None:
                            self._notify()
                        continue
                    record = self._record(event.kv.value)
                    if record is not None and self.nodes.get(record.id) != record:
                        self.nodes[record.id] = record
                        self._notify()
            except ETCD_ERRORS as exc:
                log.warning("watching the cluster's nodes broke (%s); reading them again", exc)
            await asyncio.sleep(RETRY)

    @staticmethod
    def _record(raw: bytes) -> NodeRecord | None:
        try:
            return decode(raw, NodeRecord)
        except WireError as exc:
            log.warning("a node record in etcd does not decode, skipped: %s", exc)
            return None

    async def _events(
        self, key: bytes, start: int, *, prefix: bool = True, within: float | None = None
    ) -> AsyncIterator[Any]:
        """The events on ``key`` (a prefix, or the one key) from revision ``start``;
        with ``within``, ends when none came for that long."""
        range_end = _prefix_end(key) if prefix else None
        watch = await self._client.watch(key, range_end=range_end, start_revision=start)
        try:
            events = aiter(watch)
            while True:
                try:
                    yield await asyncio.wait_for(anext(events), within)
                except (TimeoutError, StopAsyncIteration):
                    return
        finally:
            with contextlib.suppress(*ETCD_ERRORS):
                await watch.cancel()

    # ------------------------------------------------------------ the leader

    async def _elect(self) -> None:
        key = KEYS["leader"].encode()
        tx = self._client.transactions
        while True:
            await self._registered.wait()
            lease = self.lease
            if lease is None:
                continue
            try:
                won, responses = await self._client.transaction(
                    compare=[tx.create(key) == 0],
                    success=[tx.put(key, self.record.id.encode(), lease=lease)],
                    failure=[tx.get(key)],
                )
                if won:
                    revision = int(responses[0].response_put.header.revision)
                    self._lead(self.record.id, lease == self.lease)
                else:
                    found = responses[0]
                    if not found:
                        continue  # gone between the compare and now: stand again
                    value, held = found[0]
                    revision = int(held.header.revision)
                    self._lead(value.decode(), held.lease == self.lease)
                # Until the key goes (or, at the latest, a lease's time passes).
                async for event in self._events(key, revision + 1, prefix=False, within=self.ttl):
                    if event.kind == "DELETE":
                        self._lead(None, False)
                        break
                    self._lead(event.kv.value.decode(), event.kv.lease == self.lease)
            except ETCD_ERRORS as exc:
                log.warning("standing for leader failed (%s); trying again", exc)
                await asyncio.sleep(RETRY)

    def _lead(self, holder: str | None, ours: bool) -> None:
        leading = ours and holder == self.record.id and self.lease is not None
        if (holder, leading) == (self.leader, self.is_leader):
            return
        if leading != self.is_leader:
            log.info("node %s %s", self.record.id, "leads" if leading else "no longer leads")
        self.leader, self.is_leader = holder, leading
        self._notify()

    # ------------------------------------------------------------ news

    def _notify(self) -> None:
        self.changed.set()
        if self._on_change is not None:
            self._on_change()

    def live(self) -> Mapping[str, NodeRecord]:
        """The nodes whose leases are alive, by id, as this node last saw them."""
        return dict(self.nodes)
