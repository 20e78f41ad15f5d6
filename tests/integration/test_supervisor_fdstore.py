"""The built-in supervisor keeps a child's listening socket across a ``kill -9``.

A small child (a console script on PATH, as the daemons are) binds a TCP
listener through :func:`shared.notify.listening_socket`, which stores it with
the real supervisor (its own private dbus-daemon and notify socket, run as
``zlayerctl daemon run`` runs it). A client connects in a loop while the
child is killed with SIGKILL by its PID: no connection is refused, the
restarted child answers on the same socket, and once the supervisor stops
for good the port is closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
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

SUPERVISOR = """\
import asyncio
from ctl.supervisor import Supervisor
from shared.bus import DaemonInfo, Proxy1
from shared.paths import Paths

info = DaemonInfo("fdecho", "org.zlayer.FdEcho1", Proxy1, 0)
raise SystemExit(asyncio.run(Supervisor(Paths.from_env(), daemons=(info,)).run()))
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


@pytest.fixture
def supervisor(zlayer_prefix: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervised]:
    bin_dir = zlayer_prefix.prefix / "bin"
    bin_dir.mkdir()
    script = bin_dir / "zlayer-fdecho"
    script.write_text(CHILD.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    log = (zlayer_prefix.prefix / "supervisor.out").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SUPERVISOR)], stdout=log, stderr=log
    )
    supervised = Supervised(zlayer_prefix, process)
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
    wait_until(lambda: child_state(supervised)[1] == ["echo"], 30, "the child to store its socket")
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
