"""schedd's desired state in etcd (a cluster): the same interface as the SQLite store.

Everything lives under ``KEYS["state"]`` (``/zlayer/state/``), one key per row,
names percent-quoted so a key's parts never contain ``/``::

    deployments/<name>                 {revision, first_revision, stopped, removing, times, write}
    revisions/<name>/<revision:012d>   {spec_json, spec_text, filename, created_at}, zstd
    services/<name>/<service>          a ServiceState
    holds/<name>/<service>             replicas held by `scale`
    stopped/<name>/<service>           ""  (a stopped service)
    cron_runs/<name>/<service>         the last run's time
    cron_off/<name>/<service>          ""  (a cron service turned off)
    secrets/<deployment>/<name>        {nonce, ciphertext (base64, sealed), versions, times}
    events/<name>/<seq:020d>           an Event; the newest EVENTS_KEPT per deployment
    eventseq/<name>                    the last event's seq
    meta/generation                    the last view generation handed out
    meta/moved                         the digest of a lone node's state moved in

Every change of several keys is one etcd transaction, guarded by compares on
what it read (the keys' mod revisions), and tried again when another writer got
there first: readers see the old or the new state, never a mix, and two
schedds never hand out the same generation. Reads of several keys read one
revision of the store.

The interface is synchronous, like SQLite's: the store runs its own event loop
in a private thread; each call submits a coroutine there and waits for it,
bounded by ``timeout``. An etcd that does not answer in that time is
schedd's UnavailableError (``StoreUnavailableError``), one sentence.

:func:`move_to_etcd` copies a lone node's SQLite state in (``node init``).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote

import aetcd  # type: ignore[import-untyped]
import msgspec
import zstandard
from aetcd import transactions as _tx

from daemons.schedd.store import (
    EVENTS_KEPT,
    DesiredStore,
    Secret,
    ServiceState,
    Store,
    StoreClosedError,
    StoredDeployment,
)
from shared.bus import InvalidArgumentError, UnavailableError
from shared.cluster.etcd import TLSFiles, client, retrying
from shared.wire.cluster import KEYS
from shared.wire.scheduler import Event

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0  # seconds a call waits for etcd, retries included
# Seconds a call waits while etcd is known not to answer (the last call found
# it so): schedd makes some calls on its event loop, which must not stop for
# the whole timeout at every call of every pass while etcd is away.
DOWN_TIMEOUT = 1.0


# etcd did not answer in time (no quorum, unreachable, refused): schedd's
# "unavailable" bus error, so a caller reads the sentence as is.
StoreUnavailableError = UnavailableError


class ConflictError(RuntimeError):
    """A write lost to another writer more times than it retries."""


def _q(part: str) -> str:
    return quote(part, safe="")


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    return json.loads(raw)


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


class EtcdStore:
    """schedd's store in the etcd cluster at ``endpoints``."""

    recovered = False  # etcd keeps its own data safe: never rebuilt empty here

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TLSFiles | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prefix: str = KEYS["state"],
    ) -> None:
        self.timeout = timeout
        self.prefix = prefix.encode()
        self._closed = False
        self._down = False  # the last call found etcd not answering
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-store", daemon=True
        )
        self._thread.start()
        # follows the members: a running schedd reaches voters added after it started
        self._client = client(list(endpoints), tls, timeout=timeout)

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs as the store's client knows them now."""
        return self._client.endpoints

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        """Close the connection and stop the store's thread; later calls raise
        :class:`StoreClosedError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        future = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
        with contextlib.suppress(Exception):  # closing: nothing more to do with it
            future.result(self.timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make()`` on the store's loop (tried again while etcd is between
        leaders) and wait for it, at most ``timeout`` seconds (DOWN_TIMEOUT while
        etcd is known not to answer)."""
        budget = min(self.timeout, DOWN_TIMEOUT) if self._down else self.timeout
        with self._lock:
            if self._closed:
                raise StoreClosedError("schedd's store is closed: schedd is stopping")
            future = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(retrying(make, budget), budget), self._loop
            )
        try:
            result = future.result(budget + 1)
        except TimeoutError:  # the call's own deadline, or the wait's
            future.cancel()
            self._down = True
            raise self._unavailable(f"no answer within {budget:g} s") from None
        except (aetcd.ClientError, concurrent.futures.CancelledError) as exc:
            # etcd's limit ("request is too large") or gRPC's below it ("larger than max")
            if any(words in str(exc) for words in ("too large", "larger than max")):
                raise InvalidArgumentError(
                    f"the cluster's store refuses the change as too large ({exc}): "
                    "make the deployment's spec smaller"
                ) from None
            if self._closed:
                raise StoreClosedError("schedd's store is closed: schedd is stopping") from None
            self._down = True
            raise self._unavailable(str(exc) or type(exc).__name__) from None
        self._down = False
        return result

    def _unavailable(self, why: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the cluster's store (etcd at {', '.join(self.endpoints)}) does not answer: {why}; "
            "check that etcd runs and that this node reaches it"
        )

    def _key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    async def _range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        descend: bool = False,
        keys_only: bool = False,
    ) -> tuple[int, list[Any]]:
        """(the store's revision, the key-values) of one read; aetcd's own reads
        take no limit or revision, which events and snapshot reads need."""
        await self._client.connect()
        rpc = aetcd.rpc
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end or b"",
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            sort_order=rpc.RangeRequest.DESCEND if descend else rpc.RangeRequest.NONE,
            sort_target=rpc.RangeRequest.KEY,
        )
        try:
            response = await self._client.kvstub.Range(
                request, timeout=self.timeout, metadata=self._client.metadata
            )
        except rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
        return int(response.header.revision), list(response.kvs)

    async def _get(self, key: bytes, revision: int = 0) -> tuple[int, Any | None]:
        header, kvs = await self._range(key, revision=revision)
        return header, (kvs[0] if kvs else None)

    async def _prefix(
        self, prefix: bytes, revision: int = 0, **kwargs: Any
    ) -> tuple[int, list[Any]]:
        return await self._range(prefix, _range_end(prefix), revision=revision, **kwargs)

    async def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        succeeded, _ = await self._client.transaction(compare=compare, success=success, failure=[])
        return bool(succeeded)

    async def _until_committed(self, attempt: Callable[[], Awaitable[T | None]]) -> T:
        """``attempt()`` reads, decides and commits guarded by compares; None means
        another writer came first: read again."""
        for _ in range(1000):
            result = await attempt()
            if result is not None:
                return result
            await asyncio.sleep(0)
        raise ConflictError("schedd's store: too many concurrent writers on one key")

    def _tail(self, kv: Any, prefix: bytes) -> list[str]:
        return [unquote(p) for p in bytes(kv.key)[len(prefix) :].decode().split("/")]

    # ------------------------------------------------------------ deployments

    def next_revision(self, name: str) -> int:
        return self._call(lambda: self._next_revision(name, 0))

    async def _next_revision(self, name: str, revision: int) -> int:
        prefix = self._key("revisions", _q(name), "")
        _, kvs = await self._prefix(prefix, revision, limit=1, descend=True, keys_only=True)
        return int(self._tail(kvs[0], prefix)[0]) + 1 if kvs else 1

    def add_revision(
        self,
        name: str,
        spec_json: str,
        spec_text: str,
        filename: str,
        states: dict[str, ServiceState] | None = None,
    ) -> int:
        """Store a new revision and make it current, with its services' states, at once.

        Clears scale holds and stops; ``states`` replaces every service's
        rollout state (services it does not name are forgotten).
        """
        dep_key = self._key("deployments", _q(name))
        services = self._key("services", _q(name), "")
        # Marks this call's write: a commit whose answer was lost (a timeout, a
        # leader change) is found on the next try instead of made twice.
        write = uuid.uuid4().hex

        async def attempt() -> int | None:
            now = time.time()
            header, dep = await self._get(dep_key)
            doc = _loads(dep.value) if dep is not None else {"created_at": now}
            if doc.get("write") == write:
                return int(doc["revision"])
            revision = await self._next_revision(name, header)
            rev_key = self._key("revisions", _q(name), f"{revision:012d}")
            if dep is None or doc.get("removing"):  # deployed anew: its history starts here
                doc["first_revision"] = revision
            doc.update(
                revision=revision, stopped=False, removing=False, updated_at=now, write=write
            )
            compare = [
                _tx.Version(rev_key) == 0,
                _tx.Mod(dep_key) == (dep.mod_revision if dep is not None else 0),
            ]
            ops = [
                _tx.Put(rev_key, _revision_value(spec_json, spec_text, filename, now)),
                _tx.Put(dep_key, _dumps(doc)),
                _tx.Delete(
                    self._key("holds", _q(name), ""), _range_end(self._key("holds", _q(name), ""))
                ),
                _tx.Delete(
                    self._key("stopped", _q(name), ""),
                    _range_end(self._key("stopped", _q(name), "")),
                ),
            ]
            if states is not None:
                # Replace the services' states: etcd takes no put inside a deleted
                # range in one transaction, so delete the others one by one, and
                # compare that none changed since this read.
                _, current = await self._prefix(services, header, keys_only=True)
                keep = {self._key("services", _q(name), _q(s)) for s in states}
                ops += [_tx.Delete(bytes(kv.key)) for kv in current if bytes(kv.key) not in keep]
                ops += [
                    _tx.Put(self._key("services", _q(name), _q(s)), _dumps(dataclasses.asdict(st)))
                    for s, st in states.items()
                ]
                compare.append(_tx.Mod(services, _range_end(services)) < header + 1)
            return revision if await self._txn(compare, ops) else None

        return self._call(lambda: self._until_committed(attempt))

    def get(self, name: str) -> StoredDeployment | None:
        async def read() -> StoredDeployment | None:
            header, dep = await self._get(self._key("deployments", _q(name)))
            if dep is None:
                return None
            doc = _loads(dep.value)
            rev_key = self._key("revisions", _q(name), f"{doc['revision']:012d}")
            _, rev = await self._get(rev_key, header)  # the same revision of the store
            if rev is None:
                return None
            spec = _revision_doc(rev.value)
            return StoredDeployment(
                name,
                int(doc["revision"]),
                bool(doc["stopped"]),
                float(doc["created_at"]),
                float(doc["updated_at"]),
                spec["spec_json"],
                spec["spec_text"],
                bool(doc.get("removing", False)),
            )

        return self._call(read)

    async def _update_deployment(self, name: str, change: dict[str, object]) -> bool:
        """Change fields of a deployment's record, if it exists (compare-and-swap)."""
        key = self._key("deployments", _q(name))

        async def attempt() -> bool | None:
            _, dep = await self._get(key)
            if dep is None:
                return False
            doc = _loads(dep.value)
            doc.update(change, updated_at=time.time())
            ok = await self._txn([_tx.Mod(key) == dep.mod_revision], [_tx.Put(key, _dumps(doc))])
            return True if ok else None

        return await self._until_committed(attempt)

    def set_removing(self, name: str) -> None:
        """Keep the intent to remove ``name``; the loop removes it once its replicas are gone."""
        self._call(lambda: self._update_deployment(name, {"removing": True}))

    # ------------------------------------------------------------ generations

    def generation(self) -> int:
        """The generation of the last view schedd sent (0: none yet)."""

        async def read() -> int:
            _, kv = await self._get(self._key("meta", "generation"))
            return int(kv.value) if kv is not None else 0

        return self._call(read)

    def next_generation(self, at_least: int = 0) -> int:
        """A new generation, above every earlier one and above ``at_least``; two
        stores asking at once get different ones (compare-and-swap)."""
        key = self._key("meta", "generation")

        async def attempt() -> int | None:
            _, kv = await self._get(key)
            value = max(int(kv.value) if kv is not None else 0, at_least) + 1
            seen = kv.mod_revision if kv is not None else 0
            ok = await self._txn([_tx.Mod(key) == seen], [_tx.Put(key, str(value).encode())])
            return value if ok else None

        return self._call(lambda: self._until_committed(attempt))

    def names(self) -> list[str]:
        async def read() -> list[str]:
            prefix = self._key("deployments", "")
            _, kvs = await self._prefix(prefix, keys_only=True)
            return sorted(self._tail(kv, prefix)[0] for kv in kvs)

        return self._call(read)

    def remove(self, name: str) -> None:
        ops = [_tx.Delete(self._key("deployments", _q(name)))]
        ops.append(_tx.Delete(self._key("eventseq", _q(name))))
        for kind in (
            "revisions",
            "holds",
            "stopped",
            "cron_runs",
            "cron_off",
            "events",
            "services",
        ):
            prefix = self._key(kind, _q(name), "")
            ops.append(_tx.Delete(prefix, _range_end(prefix)))
        self._call(lambda: self._txn([], ops))

    def set_stopped(self, name: str, service: str, stopped: bool) -> None:
        if not service:
            self._call(lambda: self._update_deployment(name, {"stopped": stopped}))
            return
        key = self._key("stopped", _q(name), _q(service))
        self._call(lambda: self._client.put(key, b"") if stopped else self._client.delete(key))

    def stopped_services(self, name: str) -> set[str]:
        return set(self._call(lambda: self._members("stopped", name)))

    async def _members(self, kind: str, name: str) -> list[str]:
        prefix = self._key(kind, _q(name), "")
        _, kvs = await self._prefix(prefix, keys_only=True)
        return [self._tail(kv, prefix)[0] for kv in kvs]

    async def _revision_doc(self, name: str, revision: int) -> Any | None:
        _, kv = await self._get(self._key("revisions", _q(name), f"{revision:012d}"))
        return _revision_doc(kv.value) if kv is not None else None

    def revision_spec(self, name: str, revision: int) -> str | None:
        """The spec JSON of one stored revision."""
        doc = self._call(lambda: self._revision_doc(name, revision))
        return str(doc["spec_json"]) if doc is not None else None

    def revision_source(self, name: str, revision: int) -> tuple[str, str] | None:
        """The spec text and file name a revision was deployed from."""
        doc = self._call(lambda: self._revision_doc(name, revision))
        return (str(doc["spec_text"]), str(doc["filename"])) if doc is not None else None

    def revisions(self, name: str) -> list[int]:
        async def read() -> list[int]:
            header, dep = await self._get(self._key("deployments", _q(name)))
            first = int(_loads(dep.value).get("first_revision", 1)) if dep is not None else 1
            prefix = self._key("revisions", _q(name), "")
            _, kvs = await self._prefix(prefix, header, keys_only=True)
            return sorted(r for r in (int(self._tail(kv, prefix)[0]) for kv in kvs) if r >= first)

        return self._call(read)

    # ------------------------------------------------------------ per-service state

    def service_states(self, name: str) -> dict[str, ServiceState]:
        async def read() -> dict[str, ServiceState]:
            prefix = self._key("services", _q(name), "")
            _, kvs = await self._prefix(prefix)
            return {self._tail(kv, prefix)[0]: ServiceState(**_loads(kv.value)) for kv in kvs}

        return self._call(read)

    def put_service_state(self, name: str, service: str, state: ServiceState) -> None:
        key = self._key("services", _q(name), _q(service))
        value = _dumps(dataclasses.asdict(state))
        self._call(lambda: self._client.put(key, value))

    # ------------------------------------------------------------ scale holds

    def hold_scale(self, name: str, service: str, replicas: int) -> None:
        key = self._key("holds", _q(name), _q(service))
        self._call(lambda: self._client.put(key, str(int(replicas)).encode()))

    def scale_holds(self, name: str) -> dict[str, int]:
        async def read() -> dict[str, int]:
            prefix = self._key("holds", _q(name), "")
            _, kvs = await self._prefix(prefix)
            return {self._tail(kv, prefix)[0]: int(kv.value) for kv in kvs}

        return self._call(read)

    # ------------------------------------------------------------ cron

    def last_cron_run(self, name: str, service: str) -> float | None:
        async def read() -> float | None:
            _, kv = await self._get(self._key("cron_runs", _q(name), _q(service)))
            return float(kv.value) if kv is not None else None

        return self._call(read)

    def record_cron_run(self, name: str, service: str, when: float) -> None:
        key = self._key("cron_runs", _q(name), _q(service))
        self._call(lambda: self._client.put(key, repr(float(when)).encode()))

    def set_cron_enabled(self, name: str, service: str, enabled: bool) -> None:
        key = self._key("cron_off", _q(name), _q(service))
        self._call(lambda: self._client.delete(key) if enabled else self._client.put(key, b""))

    def cron_disabled(self, name: str) -> set[str]:
        return set(self._call(lambda: self._members("cron_off", name)))

    # ------------------------------------------------------------ secrets

    def _secret_key(self, name: str, deployment: str) -> bytes:
        return self._key("secrets", _q(deployment), _q(name))

    def put_secret(self, name: str, deployment: str, nonce: bytes, ciphertext: bytes) -> Secret:
        """Store a sealed value; a new secret is version 1, each change one more."""
        key = self._secret_key(name, deployment)

        async def attempt() -> Secret | None:
            now = time.time()
            _, kv = await self._get(key)
            old = _loads(kv.value) if kv is not None else None
            secret = Secret(
                name,
                deployment,
                nonce,
                ciphertext,
                float(old["created_at"]) if old else now,
                now,
                int(old["version"]) + 1 if old else 1,
            )
            seen = kv.mod_revision if kv is not None else 0
            ok = await self._txn([_tx.Mod(key) == seen], [_tx.Put(key, _secret_value(secret))])
            return secret if ok else None

        return self._call(lambda: self._until_committed(attempt))

    def secret(self, name: str, deployment: str) -> Secret | None:
        async def read() -> Secret | None:
            _, kv = await self._get(self._secret_key(name, deployment))
            return _secret(name, deployment, kv.value) if kv is not None else None

        return self._call(read)

    def secrets(self) -> list[Secret]:
        async def read() -> list[Secret]:
            prefix = self._key("secrets", "")
            _, kvs = await self._prefix(prefix)
            found = []
            for kv in kvs:
                deployment, name = self._tail(kv, prefix)
                found.append(_secret(name, deployment, kv.value))
            return sorted(found, key=lambda s: (s.deployment, s.name))

        return self._call(read)

    def remove_secret(self, name: str, deployment: str) -> bool:
        """Forget a secret; whether there was one."""
        key = self._secret_key(name, deployment)

        async def delete() -> bool:
            return await self._client.delete(key) is not None  # None: there was none

        return self._call(delete)

    # ------------------------------------------------------------ events

    def add_events(self, events: Sequence[Event]) -> None:
        """Keep ``events``, in their order: one transaction per deployment (and per
        TXN_OPS of its events); a deployment keeps its newest EVENTS_KEPT."""
        by_deployment: dict[str, list[Event]] = {}
        for event in events:
            by_deployment.setdefault(event.deployment, []).append(event)
        for name, theirs in by_deployment.items():
            step = TXN_OPS - 2  # with the sequence's put and the trim
            for start in range(0, len(theirs), step):
                self._add_events_of(name, theirs[start : start + step])

    def _add_events_of(self, name: str, events: list[Event]) -> None:
        seq_key = self._key("eventseq", _q(name))
        prefix = self._key("events", _q(name), "")

        async def attempt() -> bool | None:
            _, kv = await self._get(seq_key)
            last = int(kv.value) if kv is not None else 0
            seq = last + len(events)
            first_kept = max(seq - EVENTS_KEPT + 1, 1)
            ops = [_tx.Put(seq_key, str(seq).encode())]
            # Only the events kept are put: etcd refuses a put inside the range deleted.
            ops += [
                _tx.Put(self._key("events", _q(name), f"{n:020d}"), msgspec.json.encode(event))
                for n, event in enumerate(events, start=last + 1)
                if n >= first_kept
            ]
            if first_kept > 1:
                ops.append(_tx.Delete(prefix, self._key("events", _q(name), f"{first_kept:020d}")))
            seen = kv.mod_revision if kv is not None else 0
            return True if await self._txn([_tx.Mod(seq_key) == seen], ops) else None

        self._call(lambda: self._until_committed(attempt))

    def events(self, name: str, limit: int = 50) -> list[Event]:
        """The newest ``limit`` events of ``name``, oldest first (a negative limit: all)."""

        async def read() -> list[Event]:
            prefix = self._key("events", _q(name), "")
            _, kvs = await self._prefix(prefix, limit=max(limit, 0), descend=True)
            return [msgspec.json.decode(kv.value, type=Event) for kv in reversed(kvs)]

        if limit == 0:  # as SQLite's LIMIT 0; etcd reads 0 as no limit
            return []
        return self._call(read)


def _revision_value(spec_json: str, spec_text: str, filename: str, created_at: float) -> bytes:
    """A revision as stored: zstd-compressed JSON. A spec may be 1 MiB of text and
    as much again as JSON, over etcd's 1.5 MiB a request; compressed, specs fit
    many times over, and every revision etcd keeps in its history is smaller."""
    doc = {
        "spec_json": spec_json,
        "spec_text": spec_text,
        "filename": filename,
        "created_at": created_at,
    }
    return zstandard.ZstdCompressor(level=3).compress(_dumps(doc))


def _revision_doc(raw: bytes) -> Any:
    return _loads(zstandard.ZstdDecompressor().decompress(raw))


def _secret_value(secret: Secret) -> bytes:
    """A secret as stored: the sealed value only (base64), never the plain one."""
    return _dumps(
        {
            "nonce": base64.b64encode(secret.nonce).decode(),
            "ciphertext": base64.b64encode(secret.ciphertext).decode(),
            "created_at": secret.created_at,
            "updated_at": secret.updated_at,
            "version": secret.version,
        }
    )


def _secret(name: str, deployment: str, raw: bytes) -> Secret:
    doc = _loads(raw)
    return Secret(
        name,
        deployment,
        base64.b64decode(doc["nonce"]),
        base64.b64decode(doc["ciphertext"]),
        float(doc["created_at"]),
        float(doc["updated_at"]),
        int(doc["version"]),
    )


if TYPE_CHECKING:
    _: type[DesiredStore] = EtcdStore  # the same interface as the SQLite store


# ------------------------------------------------------------ a lone node's state into etcd

MOVED_KEY = "meta/moved"  # the digest of the state a move copied, written last


class MoveRefusedError(RuntimeError):
    """etcd holds schedd state that is not the one being moved; the message says what to do."""


def _sqlite_state(store: Store) -> dict[str, bytes]:
    """Every row of a SQLite store as the etcd store would keep it: key (under the
    prefix) -> value. Read from the tables (through the store's lock): the
    interface names no cron service nor orphaned rows, and a move takes all."""
    rows = store._rows  # same package: the tables are this module's to copy
    state: dict[str, bytes] = {}
    for name, revision, stopped, created, updated, removing, first in rows(
        "SELECT name, revision, stopped, created_at, updated_at, removing, first_revision "
        "FROM deployments"
    ):
        state[f"deployments/{_q(name)}"] = _dumps(
            {
                "created_at": created,
                "revision": revision,
                "stopped": bool(stopped),
                "removing": bool(removing),
                "first_revision": first,
                "updated_at": updated,
            }
        )
    for name, revision, spec_json, spec_text, filename, created in rows(
        "SELECT deployment, revision, spec_json, spec_text, filename, created_at FROM revisions"
    ):
        state[f"revisions/{_q(name)}/{revision:012d}"] = _revision_value(
            spec_json, spec_text, filename, created
        )
    for name, service, *fields in rows(
        "SELECT deployment, service, serving, target, rollout, message, new_count, old_count, "
        "step_at, adaptive, scaled_at, secrets FROM services"
    ):
        state[f"services/{_q(name)}/{_q(service)}"] = _dumps(
            dataclasses.asdict(ServiceState(*fields))
        )
    for name, service, replicas in rows("SELECT deployment, service, replicas FROM scale_holds"):
        state[f"holds/{_q(name)}/{_q(service)}"] = str(int(replicas)).encode()
    for name, service in rows("SELECT deployment, service FROM stopped_services"):
        state[f"stopped/{_q(name)}/{_q(service)}"] = b""
    for name, service, last_run in rows("SELECT deployment, service, last_run FROM cron_runs"):
        state[f"cron_runs/{_q(name)}/{_q(service)}"] = repr(float(last_run)).encode()
    for name, service in rows("SELECT deployment, service FROM cron_disabled"):
        state[f"cron_off/{_q(name)}/{_q(service)}"] = b""
    for secret in store.secrets():
        state[f"secrets/{_q(secret.deployment)}/{_q(secret.name)}"] = _secret_value(secret)
    seqs: dict[str, int] = {}
    for when, name, service, replica, kind, message in rows(
        "SELECT time, deployment, service, replica, kind, message FROM events ORDER BY id"
    ):
        seq = seqs[name] = seqs.get(name, 0) + 1
        event = Event(
            time=when, deployment=name, service=service, replica=replica, kind=kind, message=message
        )
        state[f"events/{_q(name)}/{seq:020d}"] = msgspec.json.encode(event)
    for name, seq in seqs.items():
        state[f"eventseq/{_q(name)}"] = str(seq).encode()
    if generation := store.generation():
        state["meta/generation"] = str(generation).encode()
    return state


TXN_OPS = 100  # etcd takes at most 128 operations in one transaction (--max-txn-ops)


def move_to_etcd(sqlite_store: Store, etcd_store: EtcdStore) -> int:
    """Copy a lone node's whole desired state into etcd (``node init``); how many
    keys it wrote.

    Safe to run again: a move already done changes nothing, and one cut short
    goes on where it stopped. Refused (:class:`MoveRefusedError`) when etcd
    holds other state: another node's move, or state written since by a cluster.
    schedd must not write to the SQLite store meanwhile.
    """
    wanted = _sqlite_state(sqlite_store)
    digest = hashlib.sha256(
        b"".join(k.encode() + b"\0" + v + b"\0" for k, v in sorted(wanted.items()))
    ).hexdigest()
    where = f"etcd at {', '.join(etcd_store.endpoints)}"
    prefix = etcd_store.prefix
    marker = prefix + MOVED_KEY.encode()

    def refuse(why: str) -> MoveRefusedError:
        return MoveRefusedError(
            f"{where} already holds schedd state that is not this node's ({why}): "
            "join that cluster instead, or point this node at an etcd of its own"
        )

    async def held() -> dict[str, bytes]:
        _, kvs = await etcd_store._prefix(prefix)
        return {bytes(kv.key)[len(prefix) :].decode(): bytes(kv.value) for kv in kvs}

    current = etcd_store._call(held)
    moved = current.pop(MOVED_KEY, None)
    if moved is not None:
        if moved.decode() == digest:
            return 0  # this very state was moved before
        raise refuse("another node's state was moved there")
    differ = sorted(k for k, v in current.items() if wanted.get(k) != v)
    if differ:
        raise refuse(f"{len(differ)} keys differ, {differ[0]} first")
    missing = [(k, v) for k, v in sorted(wanted.items()) if k not in current]

    async def write(batch: list[tuple[str, bytes]]) -> bool:
        ops = [_tx.Put(prefix + k.encode(), v) for k, v in batch]
        return await etcd_store._txn([_tx.Version(marker) == 0], ops)

    for start in range(0, len(missing), TXN_OPS):
        batch = missing[start : start + TXN_OPS]
        if not etcd_store._call(lambda b=batch: write(b)):  # type: ignore[misc]
            raise refuse("another node's state was moved there meanwhile")
    done = etcd_store._call(lambda: write([(MOVED_KEY, digest.encode())]))
    if not done:
        again = etcd_store._call(held).get(MOVED_KEY)
        if again is None or again.decode() != digest:
            raise refuse("another node's state was moved there meanwhile")
    return len(missing)
