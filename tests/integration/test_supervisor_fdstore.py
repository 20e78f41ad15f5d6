"""The built-in supervisor keeps a child's listening socket across a ``kill -9``,
and starts a child only once those it comes after are ready.

A small child (a console script on PATH, as the daemons are) binds a TCP
listener through :func:`shared.notify.listening_socket`, which stores it with
the real supervisor (its own private dbus-daemon and notify socket, run as
``zlayerctl daemon run`` runs it). A client connects in a loop while the
child is killed with SIGKILL by its PID: no connection is refused, the
restarted child answers on the same socket, and once the supervisor stops
for good the port is closed.

The start order (``START_AFTER``: agentd after registryd and overlayd, schedd
after agentd, as the units' ``After=``) is checked with two small children,
the second ordered after the first, which is slow to become ready.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl.supervisor import SupervisorState
from shared.paths import Paths

REPO = Path(__file__).resolve().parents[2]

CHILD = """\
#!{python}
import os, socket, sys
from pathlib import Path
from shared import notify

sock = notify.listening_socket("echo", socket.SOCK_STREAM, "127.0.0.1", 0)
Path(sys.argv[0] + ".port").write_text(str(sock.getsockname()[1]))
sock.settimeout(2)
notify.ready()
while True:
    notify.watchdog_ping()
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        continue
    conn.sendall(f"{{os.getpid()}}\\n".encode())
    conn.close()
"""

# Slow to be ready; says so in a file just before it is.
FIRST = """\
#!{python}
import sys, time
from pathlib import Path
from shared import notify

time.sleep(1)
Path(sys.argv[0] + ".ready").touch()
notify.ready()
time.sleep(3600)
"""

# Records whether the first was ready when it started.
SECOND = """\
#!{python}
import sys, time
from pathlib import Path
from shared import notify

first = Path(sys.argv[0]).with_name("zlayer-first.ready")
Path(sys.argv[0] + ".saw").write_text("ready" if first.exists() else "not ready")
notify.ready()
time.sleep(3600)
"""

# argv: the children's names, then "name:after,after" orderings.
SUPERVISOR = """\
import asyncio, sys
from ctl.supervisor import Supervisor
from shared.bus import DaemonInfo, Proxy1
from shared.paths import Paths

names = [a for a in sys.argv[1:] if ":" not in a]
after = {a.split(":")[0]: tuple(a.split(":")[1].split(",")) for a in sys.argv[1:] if ":" in a}
infos = tuple(DaemonInfo(n, f"org.zlayer.{n.title()}1", Proxy1, 0) for n in names)
raise SystemExit(asyncio.run(Supervisor(Paths.from_env(), daemons=infos, after=after).run()))
"""


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


class Client:
    """Connects in a loop and records who answered and what went wrong."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[int] = []
        self.refused = 0
        self.cut = 0  # accepted by the killed process, in flight when it died
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
                    line = conn.makefile().readline()
            except ConnectionRefusedError:
                self.refused += 1
                continue
            except OSError:
                self.cut += 1
                continue
            if line.strip():
                self.answers.append(int(line))
            else:
                self.cut += 1


class Supervised:
    def __init__(self, paths: Paths, process: subprocess.Popen[bytes]) -> None:
        self.paths = paths
        self.process = process

    def stop(self) -> int:
        """SIGTERM, as ``zlayerctl daemon stop`` sends; the supervisor's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@contextlib.contextmanager
def supervising(
    paths: Paths, monkeypatch: pytest.MonkeyPatch, children: dict[str, str], *orders: str
) -> Iterator[Supervised]:
    """The real supervisor, in a process of its own, over ``children`` (name: script)."""
    bin_dir = paths.prefix / "bin"
    bin_dir.mkdir()
    for name, text in children.items():
        script = bin_dir / f"zlayer-{name}"
        script.write_text(text.format(python=sys.executable))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    log = (paths.prefix / "supervisor.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, *children, *orders], stdout=log, stderr=log
    )
    supervised = Supervised(paths, process)
    try:
        yield supervised
    finally:
        try:
            assert supervised.stop() == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


@pytest.fixture
def supervisor(zlayer_prefix: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervised]:
    with supervising(zlayer_prefix, monkeypatch, {"fdecho": CHILD}) as supervised:
        yield supervised


def child_state(paths: Paths) -> tuple[int, list[str]]:
    state = SupervisorState.read(paths)
    if state is None:
        return 0, []
    child = state.daemons["fdecho"]
    return (child.pid if child.state == "running" else 0), child.fd_store


def test_a_killed_child_gets_its_socket_back_and_refuses_nothing(
    supervisor: Supervised,
) -> None:
    supervised = supervisor.paths
    # The socket is stored before the child says it is ready, and the pid
    # counts only once it is running: wait for both.
    wait_until(
        lambda: child_state(supervised)[0] != 0 and child_state(supervised)[1] == ["echo"],
        30,
        "the child to store its socket and be ready",
    )
    first_pid = child_state(supervised)[0]
    port = int((supervised.prefix / "bin" / "zlayer-fdecho.port").read_text())

    with Client(port) as client:
        wait_until(lambda: first_pid in client.answers, 10, "the first process to answer")
        os.kill(first_pid, signal.SIGKILL)
        wait_until(
            lambda: any(pid != first_pid for pid in client.answers),
            30,
            "the restarted process to answer on the kept socket",
        )
        answered_during_restart = len(client.answers)
        wait_until(lambda: len(client.answers) > answered_during_restart + 5, 10, "more answers")

    assert client.refused == 0, f"{client.refused} connections refused during the restart"
    second_pid = child_state(supervised)[0]
    assert second_pid not in (0, first_pid)
    assert set(client.answers) == {first_pid, second_pid}
    assert child_state(supervised)[1] == ["echo"]  # the same socket: not stored twice


def test_the_socket_closes_when_the_supervisor_stops_for_good(supervisor: Supervised) -> None:
    supervised = supervisor.paths
    wait_until(lambda: child_state(supervised)[1] == ["echo"], 30, "the child to store its socket")
    port = int((supervised.prefix / "bin" / "zlayer-fdecho.port").read_text())
    assert supervisor.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_child_starts_only_once_those_it_comes_after_are_ready(
    zlayer_prefix: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    children = {"second": SECOND, "first": FIRST}
    with supervising(zlayer_prefix, monkeypatch, children, "second:first") as supervisor:
        saw = supervisor.paths.prefix / "bin" / "zlayer-second.saw"
        wait_until(saw.exists, 30, "the second child to start")
        assert saw.read_text() == "ready"
        state = SupervisorState.read(supervisor.paths)
        assert state is not None and state.daemons["first"].state == "running"
