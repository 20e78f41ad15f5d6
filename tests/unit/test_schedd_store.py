"""schedd's SQLite store: crash-safe settings, and a file that is not a database moved aside."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemons.schedd.store import Store

REPO = Path(__file__).resolve().parents[2]


def filled(path: Path, count: int = 40) -> None:
    store = Store(path)
    for n in range(count):
        store.add_revision(f"app{n}", '{"services": {}}' + " " * 2000, "services: {}\n", "a.yml")
    store.close()


def test_the_store_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_a_kill_during_writes_keeps_every_committed_deployment(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from daemons.schedd.store import Store
        store = Store(Path({str(path)!r}))
        for n in range(25):
            store.add_revision(f"app{{n}}", "{{}}", "", "a.yml")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert died.returncode == -9, died.stderr
    store = Store(path)
    assert len(store.names()) == 25
    store.close()


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty header"])
def test_a_file_that_is_not_a_usable_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    path = tmp_path / "state.db"
    if how == "garbage":
        path.write_bytes(b"\x00\xffthis is not a database" * 100)
    else:
        filled(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * len(data))
    damaged = path.read_bytes()

    with caplog.at_level(logging.WARNING):
        store = Store(path)  # no exception: schedd starts
    assert store.names() == []
    store.add_revision("web", "{}", "", "web.yml")
    assert store.names() == ["web"]
    store.close()

    (aside,) = tmp_path.glob("state.db.corrupt-*")
    assert aside.read_bytes() == damaged
    (record,) = [r for r in caplog.records if r.name == "zlayer.schedd.store"]
    assert str(path) in record.getMessage() and str(aside) in record.getMessage()
    # What is there now is a sound database.
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


def test_closing_while_worker_threads_use_the_store_ends_cleanly(tmp_path: Path) -> None:
    """schedd closes its store on SIGTERM while calls it ran in threads may still be going
    (a cancelled task does not stop its thread): closing under them crashed schedd with a
    segmentation fault in SQLite. Now close waits for the call in flight, and later calls
    fail with StoreClosedError."""
    script = textwrap.dedent(
        f"""
        import threading, time
        from pathlib import Path
        from daemons.schedd.store import Store, StoreClosedError
        store = Store(Path({str(tmp_path / "state.db")!r}))
        store.add_revision("app", "{{}}", "", "a.yml")
        refused = []

        def work():
            try:
                while True:
                    store.next_generation()
                    store.get("app")
                    store.events("app")
            except StoreClosedError as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        store.close()
        for thread in threads:
            thread.join()
        print(len(refused), refused[0])
        """
    )
    for _ in range(5):
        ran = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "4 schedd's store is closed: schedd is stopping"
