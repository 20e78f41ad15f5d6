"""schedd's desired state in SQLite: deployments, their revisions, scale holds, events,
secrets (sealed), cron services turned off.

Every write is one transaction in WAL mode with ``synchronous=FULL``, so a
schedd killed at any moment (or a power cut) restarts with either the old or
the new desired state, never a mix. A file that is not a usable database is
moved aside (logged) and schedd starts with an empty store instead of failing
at every start. Calls are synchronous; schedd makes every one of them in a
thread of their own, in the order its event loop made them (:class:`StoreThread`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, TypeVarTuple

from shared.statefile import move_aside
from shared.wire.scheduler import Event

log = logging.getLogger("zlayer.schedd.store")

T = TypeVar("T")
Args = TypeVarTuple("Args")


class StoreClosedError(RuntimeError):
    """A call after :meth:`Store.close` (schedd is stopping)."""


# Where a service's last rollout stands: none (or finished), under way, stopped by a failure.
Rollout = Literal["", "running", "failed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    stopped INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    deployment TEXT NOT NULL,
    revision INTEGER NOT NULL,
    spec_json TEXT NOT NULL,
    spec_text TEXT NOT NULL,
    filename TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (deployment, revision)
);
CREATE TABLE IF NOT EXISTS scale_holds (
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    replicas INTEGER NOT NULL,
    PRIMARY KEY (deployment, service)
);
CREATE TABLE IF NOT EXISTS stopped_services (
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (deployment, service)
);
CREATE TABLE IF NOT EXISTS cron_runs (
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    last_run REAL NOT NULL,
    PRIMARY KEY (deployment, service)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    replica TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_deployment ON events (deployment, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- A secret's value, AES-256-GCM sealed with the node's secrets key; the name and
-- deployment are its associated data, so a row moved to another name fails to open.
-- deployment '' is a node-wide secret.
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    deployment TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, deployment)
);
CREATE TABLE IF NOT EXISTS cron_disabled (
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (deployment, service)
);
CREATE TABLE IF NOT EXISTS services (
    deployment TEXT NOT NULL,
    service TEXT NOT NULL,
    serving INTEGER NOT NULL,      -- the revision whose replicas serve now
    target INTEGER NOT NULL,       -- the revision being rolled out (= serving when none)
    rollout TEXT NOT NULL DEFAULT '',  -- '', 'running', 'failed'
    message TEXT NOT NULL DEFAULT '',
    new_count INTEGER NOT NULL DEFAULT 0,
    old_count INTEGER NOT NULL DEFAULT 0,
    step_at REAL NOT NULL DEFAULT 0,   -- when the rollout last made progress
    adaptive INTEGER,              -- the autoscaler's replica count, if it decided one
    scaled_at REAL NOT NULL DEFAULT 0,
    secrets TEXT NOT NULL DEFAULT '',  -- digest of the secret versions its target reads
    PRIMARY KEY (deployment, service)
);
"""

EVENTS_KEPT = 2000  # per deployment


@dataclass
class ServiceState:
    """Where a service's rollout and autoscaling stand; survives a schedd restart."""

    serving: int
    target: int
    rollout: Rollout = ""
    message: str = ""
    new_count: int = 0
    old_count: int = 0
    step_at: float = 0.0
    adaptive: int | None = None
    scaled_at: float = 0.0
    # Which versions of the secrets its env reads the target revision was rolled
    # out with (a digest, "" for none): a different one now means a secret
    # changed without a roll (schedd stopped in between), and the loop rolls it.
    secrets: str = ""


@dataclass(frozen=True)
class StoredDeployment:
    name: str
    revision: int
    stopped: bool
    created_at: float
    updated_at: float
    spec_json: str
    spec_text: str
    # `down` was asked: the intent is kept until the replicas are gone, so a
    # removal cut short by a stop of the daemons finishes at the next start.
    removing: bool = False


# The services table's columns in ServiceState's order (after deployment and service).
_SERVICE_COLUMNS = (
    "deployment, service, serving, target, rollout, message, new_count, old_count, "
    "step_at, adaptive, scaled_at, secrets"
)
_SECRET_COLUMNS = "name, deployment, nonce, ciphertext, created_at, updated_at, version"


@dataclass(frozen=True)
class Secret:
    """One stored secret, its value still sealed."""

    name: str
    deployment: str  # "" for node-wide
    nonce: bytes = dataclasses.field(repr=False)
    ciphertext: bytes = dataclasses.field(repr=False)
    created_at: float
    updated_at: float
    version: int


class DesiredStore(Protocol):
    """What schedd reads and writes of its desired state, whichever backend keeps it:
    :class:`Store` (SQLite, a lone node) or ``EtcdStore`` (etcd, a cluster).

    Calls are synchronous; schedd makes them in :class:`StoreThread`, never on
    its event loop. Every write is all or nothing. After :meth:`close`, calls raise
    :class:`StoreClosedError`.
    """

    # The backing state was unusable and the store started empty.
    recovered: bool

    def close(self) -> None: ...

    def next_revision(self, name: str) -> int: ...

    def add_revision(
        self,
        name: str,
        spec_json: str,
        spec_text: str,
        filename: str,
        states: dict[str, ServiceState] | None = None,
    ) -> int: ...

    def get(self, name: str) -> StoredDeployment | None: ...

    def set_removing(self, name: str) -> None: ...

    def generation(self) -> int: ...

    def next_generation(self, at_least: int = 0) -> int: ...

    def names(self) -> list[str]: ...

    def remove(self, name: str) -> None: ...

    def set_stopped(self, name: str, service: str, stopped: bool) -> None: ...

    def stopped_services(self, name: str) -> set[str]: ...

    def revision_spec(self, name: str, revision: int) -> str | None: ...

    def revision_source(self, name: str, revision: int) -> tuple[str, str] | None: ...

    def revisions(self, name: str) -> list[int]:
        """The revisions of ``name`` since it was last deployed anew (none before a
        deploy that ended its removal): those a rollback can go back to."""
        ...

    def service_states(self, name: str) -> dict[str, ServiceState]: ...

    def put_service_state(self, name: str, service: str, state: ServiceState) -> None: ...

    def hold_scale(self, name: str, service: str, replicas: int) -> None: ...

    def scale_holds(self, name: str) -> dict[str, int]: ...

    def last_cron_run(self, name: str, service: str) -> float | None: ...

    def record_cron_run(self, name: str, service: str, when: float) -> None: ...

    def set_cron_enabled(self, name: str, service: str, enabled: bool) -> None: ...

    def cron_disabled(self, name: str) -> set[str]: ...

    def put_secret(self, name: str, deployment: str, nonce: bytes, ciphertext: bytes) -> Secret: ...

    def secret(self, name: str, deployment: str) -> Secret | None: ...

    def secrets(self) -> list[Secret]: ...

    def remove_secret(self, name: str, deployment: str) -> bool: ...

    def add_events(self, events: Sequence[Event]) -> None: ...

    def events(self, name: str, limit: int = 50) -> list[Event]: ...


class StoreThread:
    """Where schedd's store calls run: off the event loop, one at a time, in the order
    the loop made them.

    A SQLite commit waits for its fsync and an etcd call is a round trip (up to
    its timeout when etcd is away): on the event loop either holds every bus
    call and replica signal behind it. One worker thread, first in first out,
    keeps the loop's order, so a write posted and not waited for (an event)
    is in the store before any later read asks for it, and two writes of one
    row land as they were made. A function run here calls the store directly,
    never :meth:`call` (it would wait on itself).
    """

    def __init__(self) -> None:
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="schedd-store"
        )

    async def call(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        """``fn(*args)`` run in the store's thread, after every call made before it."""
        return await asyncio.wrap_future(self._worker.submit(fn, *args))

    def post(self, fn: Callable[[*Args], object], *args: *Args) -> None:
        """``fn(*args)`` run in the store's thread without waiting for it; a failure
        is logged (an event lost while etcd is away is the one thing posted)."""
        self._worker.submit(fn, *args).add_done_callback(_log_posted_failure)

    async def drain(self) -> None:
        """Wait until every call made so far has run."""
        await self.call(_nothing)


def _nothing() -> None:
    return None


def _log_posted_failure(future: concurrent.futures.Future[object]) -> None:
    exc = future.exception()
    if isinstance(exc, StoreClosedError):
        return  # schedd is stopping
    if exc is not None:
        log.warning("a store write not waited for failed: %s", exc)


class Store:
    """The SQLite database at ``path``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        # The file was unusable and this store starts empty (see the scheduler:
        # it sends no view until something is deployed again).
        self.recovered = False
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError as exc:
            aside = move_aside(path)
            wal = path.with_name(path.name + "-wal")
            if wal.exists():  # its log belongs to the bad file, not to a new one
                move_aside(wal)
            path.with_name(path.name + "-shm").unlink(missing_ok=True)
            log.warning(
                "%s is not a usable database (%s); moved it to %s and started an empty store: "
                "deploy again",
                path,
                exc,
                aside,
            )
            self._db = _open(path)
            self.recovered = True
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(deployments)")}
        if "removing" not in columns:  # a store made before removals were persisted
            self._db.execute(
                "ALTER TABLE deployments ADD COLUMN removing INTEGER NOT NULL DEFAULT 0"
            )
        if "first_revision" not in columns:  # a store made before a deploy could end a removal
            self._db.execute(
                "ALTER TABLE deployments ADD COLUMN first_revision INTEGER NOT NULL DEFAULT 1"
            )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(services)")}
        if "secrets" not in columns:  # a store made before secrets
            self._db.execute("ALTER TABLE services ADD COLUMN secrets TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        """Close the database once no thread is using it.

        Calls run in worker threads that a cancelled task does not stop: closing
        the connection under one of them crashes the process (in SQLite's C code),
        so every call holds the lock and sees the store closed after this.
        """
        with self._lock:
            self._closed = True
            self._db.close()

    def _open_db(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosedError("schedd's store is closed: schedd is stopping")
        return self._db

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._open_db().execute(sql, params).fetchall()

    def _row(self, sql: str, params: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._open_db().execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------ deployments

    def next_revision(self, name: str) -> int:
        row = self._row("SELECT MAX(revision) FROM revisions WHERE deployment = ?", (name,))
        return int(row[0] or 0) + 1 if row else 1

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
        rollout state (services it does not name are forgotten). A deployment
        being removed is deployed anew: its history starts again at this revision
        (:meth:`revisions`), as after a removal that ended.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT MAX(revision) FROM revisions WHERE deployment = ?", (name,)
            ).fetchone()
            revision = int(row[0] or 0) + 1
            db.execute(
                "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
                (name, revision, spec_json, spec_text, filename, now),
            )
            # SET's expressions read the row as it was: ``removing`` before this write.
            db.execute(
                "INSERT INTO deployments (name, revision, stopped, created_at, updated_at, "
                "first_revision) VALUES (?, ?, 0, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "revision = excluded.revision, stopped = 0, removing = 0, "
                "first_revision = CASE WHEN removing THEN excluded.revision "
                "ELSE first_revision END, updated_at = excluded.updated_at",
                (name, revision, now, now, revision),
            )
            db.execute("DELETE FROM scale_holds WHERE deployment = ?", (name,))
            db.execute("DELETE FROM stopped_services WHERE deployment = ?", (name,))
            if states is not None:
                db.execute("DELETE FROM services WHERE deployment = ?", (name,))
                for service, state in states.items():
                    db.execute(
                        f"INSERT INTO services ({_SERVICE_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, service, *dataclasses.astuple(state)),
                    )
        return revision

    def get(self, name: str) -> StoredDeployment | None:
        row = self._row(
            "SELECT d.name, d.revision, d.stopped, d.created_at, d.updated_at, "
            "r.spec_json, r.spec_text, d.removing FROM deployments d JOIN revisions r "
            "ON r.deployment = d.name AND r.revision = d.revision WHERE d.name = ?",
            (name,),
        )
        if row is None:
            return None
        name, revision, stopped, created, updated, spec_json, spec_text, removing = row
        return StoredDeployment(
            name,
            revision,
            bool(stopped),
            created,
            updated,
            spec_json,
            spec_text,
            bool(removing),
        )

    def set_removing(self, name: str) -> None:
        """Keep the intent to remove ``name``; the loop removes it once its replicas are gone."""
        with self._tx() as db:
            db.execute(
                "UPDATE deployments SET removing = 1, updated_at = ? WHERE name = ?",
                (time.time(), name),
            )

    # ------------------------------------------------------------ generations

    def generation(self) -> int:
        """The generation of the last view schedd sent (0: none yet)."""
        row = self._row("SELECT value FROM meta WHERE key = 'generation'")
        return int(row[0]) if row else 0

    def next_generation(self, at_least: int = 0) -> int:
        """A new generation, above every earlier one and above ``at_least``."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            value = max(int(row[0]) if row else 0, at_least) + 1
            db.execute(
                "INSERT INTO meta VALUES ('generation', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (value,),
            )
        return value

    def names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT name FROM deployments ORDER BY name")]

    def remove(self, name: str) -> None:
        with self._tx() as db:
            for table in ("deployments",):
                db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
            for table in (
                "revisions",
                "scale_holds",
                "stopped_services",
                "cron_runs",
                "cron_disabled",
                "events",
                "services",
            ):
                db.execute(f"DELETE FROM {table} WHERE deployment = ?", (name,))

    def set_stopped(self, name: str, service: str, stopped: bool) -> None:
        with self._tx() as db:
            if service:
                if stopped:
                    db.execute(
                        "INSERT OR IGNORE INTO stopped_services VALUES (?, ?)", (name, service)
                    )
                else:
                    db.execute(
                        "DELETE FROM stopped_services WHERE deployment = ? AND service = ?",
                        (name, service),
                    )
            else:
                db.execute(
                    "UPDATE deployments SET stopped = ?, updated_at = ? WHERE name = ?",
                    (int(stopped), time.time(), name),
                )

    def stopped_services(self, name: str) -> set[str]:
        rows = self._rows("SELECT service FROM stopped_services WHERE deployment = ?", (name,))
        return {r[0] for r in rows}

    def revision_spec(self, name: str, revision: int) -> str | None:
        """The spec JSON of one stored revision."""
        row = self._row(
            "SELECT spec_json FROM revisions WHERE deployment = ? AND revision = ?",
            (name, revision),
        )
        return str(row[0]) if row else None

    def revision_source(self, name: str, revision: int) -> tuple[str, str] | None:
        """The spec text and file name a revision was deployed from."""
        row = self._row(
            "SELECT spec_text, filename FROM revisions WHERE deployment = ? AND revision = ?",
            (name, revision),
        )
        return (str(row[0]), str(row[1])) if row else None

    def revisions(self, name: str) -> list[int]:
        rows = self._rows(
            "SELECT r.revision FROM revisions r JOIN deployments d ON d.name = r.deployment "
            "WHERE r.deployment = ? AND r.revision >= d.first_revision ORDER BY r.revision",
            (name,),
        )
        return [int(r[0]) for r in rows]

    # ------------------------------------------------------------ per-service state

    def service_states(self, name: str) -> dict[str, ServiceState]:
        rows = self._rows(
            f"SELECT {_SERVICE_COLUMNS.removeprefix('deployment, ')} FROM services "
            "WHERE deployment = ?",
            (name,),
        )
        return {r[0]: ServiceState(*r[1:]) for r in rows}

    def put_service_state(self, name: str, service: str, state: ServiceState) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT INTO services ({_SERVICE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(deployment, service) DO UPDATE SET serving = excluded.serving, "
                "target = excluded.target, rollout = excluded.rollout, "
                "message = excluded.message, new_count = excluded.new_count, "
                "old_count = excluded.old_count, step_at = excluded.step_at, "
                "adaptive = excluded.adaptive, scaled_at = excluded.scaled_at, "
                "secrets = excluded.secrets",
                (name, service, *dataclasses.astuple(state)),
            )

    # ------------------------------------------------------------ scale holds

    def hold_scale(self, name: str, service: str, replicas: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO scale_holds VALUES (?, ?, ?) ON CONFLICT(deployment, service) "
                "DO UPDATE SET replicas = excluded.replicas",
                (name, service, replicas),
            )

    def scale_holds(self, name: str) -> dict[str, int]:
        rows = self._rows("SELECT service, replicas FROM scale_holds WHERE deployment = ?", (name,))
        return {r[0]: int(r[1]) for r in rows}

    # ------------------------------------------------------------ cron

    def last_cron_run(self, name: str, service: str) -> float | None:
        row = self._row(
            "SELECT last_run FROM cron_runs WHERE deployment = ? AND service = ?", (name, service)
        )
        return float(row[0]) if row else None

    def record_cron_run(self, name: str, service: str, when: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cron_runs VALUES (?, ?, ?) ON CONFLICT(deployment, service) "
                "DO UPDATE SET last_run = excluded.last_run",
                (name, service, when),
            )

    def set_cron_enabled(self, name: str, service: str, enabled: bool) -> None:
        with self._tx() as db:
            if enabled:
                db.execute(
                    "DELETE FROM cron_disabled WHERE deployment = ? AND service = ?",
                    (name, service),
                )
            else:
                db.execute("INSERT OR IGNORE INTO cron_disabled VALUES (?, ?)", (name, service))

    def cron_disabled(self, name: str) -> set[str]:
        rows = self._rows("SELECT service FROM cron_disabled WHERE deployment = ?", (name,))
        return {r[0] for r in rows}

    # ------------------------------------------------------------ secrets

    def put_secret(self, name: str, deployment: str, nonce: bytes, ciphertext: bytes) -> Secret:
        """Store a sealed value; a new secret is version 1, each change one more."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT(name, deployment) DO UPDATE SET nonce = excluded.nonce, "
                "ciphertext = excluded.ciphertext, updated_at = excluded.updated_at, "
                "version = version + 1",
                (name, deployment, nonce, ciphertext, now, now),
            )
            row = db.execute(
                f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ? AND deployment = ?",
                (name, deployment),
            ).fetchone()
        return Secret(*row)

    def secret(self, name: str, deployment: str) -> Secret | None:
        row = self._row(
            f"SELECT {_SECRET_COLUMNS} FROM secrets WHERE name = ? AND deployment = ?",
            (name, deployment),
        )
        return Secret(*row) if row else None

    def secrets(self) -> list[Secret]:
        rows = self._rows(f"SELECT {_SECRET_COLUMNS} FROM secrets ORDER BY deployment, name")
        return [Secret(*r) for r in rows]

    def remove_secret(self, name: str, deployment: str) -> bool:
        """Forget a secret; whether there was one."""
        with self._tx() as db:
            gone = db.execute(
                "DELETE FROM secrets WHERE name = ? AND deployment = ?", (name, deployment)
            ).rowcount
        return bool(gone)

    # ------------------------------------------------------------ events

    def add_events(self, events: Sequence[Event]) -> None:
        """Keep ``events``, in their order, in one transaction (one fsync for all);
        a deployment keeps its newest EVENTS_KEPT."""
        if not events:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO events (time, deployment, service, replica, kind, message) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(e.time, e.deployment, e.service, e.replica, e.kind, e.message) for e in events],
            )
            for name in dict.fromkeys(e.deployment for e in events):
                db.execute(
                    "DELETE FROM events WHERE deployment = ? AND id <= (SELECT MAX(id) "
                    "FROM events WHERE deployment = ?) - ?",
                    (name, name, EVENTS_KEPT),
                )

    def events(self, name: str, limit: int = 50) -> list[Event]:
        rows = self._rows(
            "SELECT time, deployment, service, replica, kind, message FROM events "
            "WHERE deployment = ? ORDER BY id DESC LIMIT ?",
            (name, limit),
        )
        return [
            Event(time=t, deployment=d, service=s, replica=r, kind=k, message=m)
            for t, d, s, r, k, m in reversed(rows)
        ]


if TYPE_CHECKING:
    _: type[DesiredStore] = Store  # the SQLite store meets the interface (mypy checks)


def _open(path: Path) -> sqlite3.Connection:
    """The database at ``path``, checked; sqlite3.DatabaseError if it is not a usable one."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:3]))
        db.executescript(SCHEMA)
    except BaseException:
        db.close()
        raise
    return db
