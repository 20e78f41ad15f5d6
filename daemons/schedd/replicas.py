"""This node's replicas as schedd knows them: one full list from agentd, then its signals.

agentd emits ``ReplicaChanged`` with the whole ReplicaInfo every time a
replica's state, health or message changes, so schedd keeps a copy instead
of asking for the list at every reconcile pass and every status call. The
full list is asked for again only when the copy may have missed something:

- at the start, and whenever the signal subscription is not in place (it
  broke, and is being made again);
- when agentd restarted (its ``Status`` shows another pid or start time;
  agentd also asks for a resync when it starts), or did not answer;
- every ``REFETCH_INTERVAL`` seconds, as a safety net.

``zlayer_scheduler_replica_refetches`` counts the lists asked for, by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter

from shared.bus import UnavailableError, ZLayerError
from shared.clients import AgentClient
from shared.wire import WireError
from shared.wire.agent import ReplicaInfo

T = TypeVar("T")

log = logging.getLogger("zlayer.schedd")

REFETCHES = Counter(
    "zlayer_scheduler_replica_refetches",
    "Full replica lists asked of agentd, by reason (start, unsubscribed: the signal "
    "subscription is being made again, agentd-restarted, agentd-unreachable, resync, periodic).",
    ["reason"],
)
SIGNALS = Counter(
    "zlayer_scheduler_replica_signals",
    "ReplicaChanged signals taken into schedd's copy of the replica list.",
)

AGENT_TIMEOUT = 20.0
REFETCH_INTERVAL = 15.0  # the full list again, in case a signal was lost
CHECK_INTERVAL = 1.0  # agentd's Status at most this often: is it the same process?
RESUBSCRIBE_DELAY = 1.0


async def agent_call(call: Awaitable[T], timeout: float = AGENT_TIMEOUT) -> T:
    """``call`` to agentd; UnavailableError with a sentence when it does not answer."""
    try:
        return await asyncio.wait_for(call, timeout)
    except (ZLayerError, WireError):  # its own error, or a reply of another version
        raise
    except TimeoutError:
        raise UnavailableError(
            "zlayer-agentd did not answer in time; check `zlayerctl status`"
        ) from None
    except Exception as exc:
        raise UnavailableError(
            f"zlayer-agentd is not reachable ({exc}); check `zlayerctl status`"
        ) from None


def _gone(info: ReplicaInfo) -> bool:
    """Whether the signal says the replica is no longer on the node.

    agentd signals ``stopped`` once it removed a replica. A finished run of a
    job or cron job (exited or failed, not restarting) is removed with no
    further signal, its outcome kept in the job history; a run that restarts
    signals again (``restarting``) and comes back.
    """
    if info.state == "stopped":
        return True
    return info.rtype != "service" and info.state in ("exited", "failed")


def _same(held: ReplicaInfo | None, listed: ReplicaInfo) -> bool:
    """Whether a listed replica is as held: what agentd signals a change of is unchanged."""
    return held is not None and (held.state, held.health, held.message) == (
        listed.state,
        listed.health,
        listed.message,
    )


class ReplicaCache:
    """The replicas agentd runs, kept current from its ``ReplicaChanged`` signals."""

    def __init__(self, agent: AgentClient, changed: Callable[[], None]) -> None:
        self.agent = agent
        self.changed = changed  # called after every signal taken (the scheduler wakes)
        self._replicas: dict[str, ReplicaInfo] = {}
        self._since: dict[str, float] = {}  # id -> when agentd last reported a change of it
        self._stale = "start"  # why the copy cannot be trusted; "" when it can
        self._fetched_at = 0.0
        self._checked_at = 0.0
        self._agentd: tuple[int, int] | None = None  # (pid, started_at_usec) of the list's agentd
        self._listening = False
        # While a list is on its way: the signals taken meanwhile, id -> info (None: gone),
        # which are at least as new as the list for those replicas.
        self._during_fetch: dict[str, ReplicaInfo | None] | None = None
        self._lock = asyncio.Lock()
        # Given each replica agentd reports changed (a job's last one too), for events.
        self.noted: Callable[[ReplicaInfo], None] | None = None

    def invalidate(self, reason: str) -> None:
        """Ask for the full list at the next read."""
        if not self._stale:
            self._stale = reason

    async def replicas(self, deployment: str = "") -> list[ReplicaInfo]:
        """The replicas of ``deployment`` ("" for all), in agentd's order; UnavailableError
        when agentd does not answer."""
        async with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= CHECK_INTERVAL:
                await self._check_agentd()
                self._checked_at = now
            reason = self._stale
            if not self._listening:
                reason = "unsubscribed"
            elif not reason and now - self._fetched_at >= REFETCH_INTERVAL:
                reason = "periodic"
            if reason:
                await self._refetch(reason)
            found = [
                r for r in self._replicas.values() if not deployment or r.deployment == deployment
            ]
        return sorted(found, key=lambda r: (r.deployment, r.service, r.revision, r.instance))

    def since(self, replica_id: str) -> float:
        """When agentd last reported a change of the replica (time.monotonic())."""
        return self._since.get(replica_id, 0.0)

    async def _check_agentd(self) -> None:
        """Whether agentd is the process whose list is held; its Status, not the list."""
        try:
            status = await agent_call(self.agent.status())
        except UnavailableError:
            self.invalidate("agentd-unreachable")
            raise
        identity = (status.pid, status.started_at_usec)
        if self._agentd is not None and identity != self._agentd:
            log.info("zlayer-agentd restarted (pid %d); reading its replicas again", status.pid)
            self.invalidate("agentd-restarted")
        self._agentd = identity

    async def _refetch(self, reason: str) -> None:
        REFETCHES.labels(reason).inc()
        self._during_fetch = {}
        try:
            listed = await agent_call(self.agent.list_replicas())
            fresh = {r.id: r for r in listed}
            for replica_id, info in self._during_fetch.items():
                if info is None:
                    fresh.pop(replica_id, None)
                else:
                    fresh[replica_id] = info
        except BaseException:
            self._stale = self._stale or reason
            raise
        finally:
            self._during_fetch = None
        now = time.monotonic()
        self._since = {
            replica_id: self._since.get(replica_id, now)
            if _same(self._replicas.get(replica_id), info)
            else now
            for replica_id, info in fresh.items()
        }
        self._replicas = fresh
        self._stale = ""
        self._fetched_at = now

    def take(self, info: ReplicaInfo) -> None:
        """One ``ReplicaChanged``: the replica's entry replaced, or dropped when it is gone."""
        SIGNALS.inc()
        if self.noted is not None:
            self.noted(info)
        gone = _gone(info)
        if gone:
            self._replicas.pop(info.id, None)
            self._since.pop(info.id, None)
        else:
            self._replicas[info.id] = info
            self._since[info.id] = time.monotonic()
        if self._during_fetch is not None:
            self._during_fetch[info.id] = None if gone else info
        self.changed()

    async def watch(self) -> None:
        """Take agentd's signals for as long as schedd runs; subscribe again when it breaks."""
        while True:
            try:
                # The subscription (AddMatch) is sent before this task first waits, so a
                # list asked for once ``_listening`` is set comes after it on the same
                # connection: the bus routes every later change to us.
                self._listening = True
                async for info in self.agent.replica_changes():
                    self.take(info)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus hiccupped: a full list once subscribed again
                log.debug("replica signal watch ended: %s", exc)
            self._listening = False
            self.invalidate("unsubscribed")
            await asyncio.sleep(RESUBSCRIBE_DELAY)
