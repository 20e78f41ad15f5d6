"""shared.notify against a real AF_UNIX datagram socket, and ctl.fdstore's two sides.

The receiving end is a plain socket bound in the test's directory with
SO_PASSCRED, as systemd and the built-in supervisor hold it. Passing
descriptors at start (``LISTEN_FDS``) is checked in a real child process
started the way the supervisor starts its daemons.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.fdstore import ChildStart, FdStore, NotifyMessage, receive
from shared import notify

REPO = Path(__file__).resolve().parents[2]


class Receiver:
    """The supervisor's end of NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def next(self) -> NotifyMessage:
        self.sock.setblocking(True)
        self.sock.settimeout(5)
        message = receive(self.sock)
        assert message is not None
        return message

    def pending(self) -> NotifyMessage | None:
        self.sock.setblocking(False)
        return receive(self.sock)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    got = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield got
    got.close()


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def serves(fd: int, sock: socket.socket) -> bool:
    """Whether descriptor ``fd`` accepts the connections made to ``sock``'s address."""
    with socket.socket(fileno=os.dup(fd)) as held, socket.create_connection(sock.getsockname()):
        held.settimeout(5)
        conn, _ = held.accept()
        conn.close()
        return True


def test_readiness_status_and_watchdog_lines_arrive_with_our_pid(receiver: Receiver) -> None:
    notify.ready("serving")
    message = receiver.next()
    assert message.lines == ["READY=1", "STATUS=serving"]
    assert message.pid == os.getpid()
    notify.watchdog_ping()
    assert receiver.next().lines == ["WATCHDOG=1"]
    notify.status("busy")
    assert receiver.next().lines == ["STATUS=busy"]
    notify.stopping()
    assert receiver.next().lines == ["STOPPING=1"]


def test_a_stored_socket_arrives_under_its_name_replacing_the_old(receiver: Receiver) -> None:
    with listener() as sock:
        assert notify.store_socket("web-80", sock)
        removal = receiver.next()
        assert removal.lines == ["FDSTOREREMOVE=1", "FDNAME=web-80"]
        assert removal.fds == []
        stored = receiver.next()
        assert stored.lines == ["FDSTORE=1", "FDNAME=web-80"]
        assert len(stored.fds) == 1
        assert serves(stored.fds[0], sock)
        stored.close_fds()


def test_remove_names_the_socket(receiver: Receiver) -> None:
    assert notify.remove_socket("dns-udp")
    assert receiver.next().lines == ["FDSTOREREMOVE=1", "FDNAME=dns-udp"]


def test_an_abstract_notify_socket_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"zlayer-notify-test-{os.getpid()}"
    got = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify.ready()
        assert got.next().lines == ["READY=1"]
    finally:
        got.close()


def test_without_a_supervisor_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with listener() as sock:
        assert not notify.store_socket("web", sock)
    assert not notify.remove_socket("web")
    notify.ready()  # a no-op, not an error


def test_a_gone_supervisor_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    with listener() as sock:
        assert not notify.store_socket("web", sock)
    notify.watchdog_ping()


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "x" * 256, "é"])
def test_names_systemd_would_refuse_are_refused(name: str) -> None:
    assert not notify.valid_fdname(name)
    with pytest.raises(ValueError):
        notify.remove_socket(name)


# ---------------------------------------------------------------- the store


def stored(name: str, *socks: socket.socket) -> NotifyMessage:
    return NotifyMessage(
        pid=1, lines=["FDSTORE=1", f"FDNAME={name}"], fds=[os.dup(s.fileno()) for s in socks]
    )


def open_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_store_replaces_by_name_removes_and_is_bounded() -> None:
    store = FdStore(limit=2)
    with listener() as a, listener() as b, listener() as c:
        assert store.apply(stored("a", a)) is None
        first = store.passed()[0][1]
        assert store.apply(stored("a", b)) is None
        assert not open_fd(first)  # the replaced copy is closed
        assert [name for name, _ in store.passed()] == ["a"]
        assert serves(store.passed()[0][1], b)
        assert store.apply(stored("b", b)) is None
        full = stored("c", c)
        refused = store.apply(full)
        assert refused is not None and "full" in refused
        assert full.fds == []  # closed, not leaked
        assert store.names() == ["a", "b"]
        removal = NotifyMessage(pid=1, lines=["FDSTOREREMOVE=1", "FDNAME=a"])
        assert store.apply(removal) is None
        assert store.names() == ["b"]
        kept = store.passed()[0][1]
        store.close()
        assert not open_fd(kept)
        assert len(store) == 0


# ---------------------------------------------------------------- passing at start

CHILD = """
import json, os, socket
from shared import notify
got = notify.listen_fds()
out = {}
for name, sock in got.items():
    out[name] = {
        "type": int(sock.type),
        "address": list(sock.getsockname()),
        "inheritable": sock.get_inheritable(),
    }
conn, _ = got["web"].accept()
conn.sendall(b"from the child")
conn.close()
left = {v: os.environ.get(v) for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
again = sorted(notify.listen_fds())
taken = notify.take_socket("web") is not None
print(json.dumps({"sockets": out, "env": left, "extra": os.environ.get("EXTRA"),
                  "again": again, "taken": taken, "after": sorted(notify.listen_fds())}))
"""


def test_passed_sockets_reach_the_child_by_name() -> None:
    with listener() as web, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        dns.bind(("127.0.0.1", 0))
        web_address = web.getsockname()
        start = ChildStart(
            env={"EXTRA": "yes", "PYTHONPATH": str(REPO)},
            passed=[("web", web.fileno()), ("dns", dns.fileno())],
        )
        with start.reserved():
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD],
                stdout=subprocess.PIPE,
                env=None,
                pass_fds=start.pass_fds,
                preexec_fn=start.preexec,
            )
        with socket.create_connection(web.getsockname(), timeout=10) as client:
            assert client.recv(100) == b"from the child"
        out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    report = json.loads(out)
    assert report["sockets"]["web"]["type"] == socket.SOCK_STREAM
    assert report["sockets"]["dns"]["type"] == socket.SOCK_DGRAM
    assert tuple(report["sockets"]["web"]["address"]) == web_address
    assert not report["sockets"]["web"]["inheritable"]  # CLOEXEC once taken
    assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert report["extra"] == "yes"
    assert report["again"] == ["dns", "web"]
    assert report["taken"] is True
    assert report["after"] == ["dns"]


def test_sockets_meant_for_another_pid_are_not_taken() -> None:
    script = (
        "import json; from shared import notify; print(json.dumps(sorted(notify.listen_fds())))"
    )
    with listener() as web:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "LISTEN_PID": "1",
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "web",
        }
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert web.fileno() > 0
    assert json.loads(out) == []


def test_listening_socket_binds_and_stores_then_reuses_what_was_passed(
    receiver: Receiver,
) -> None:
    sock = notify.listening_socket("echo", socket.SOCK_STREAM, "127.0.0.1", 0)
    try:
        assert sock.getblocking() is False
        assert receiver.next().lines == ["FDSTOREREMOVE=1", "FDNAME=echo"]
        message = receiver.next()
        assert message.lines == ["FDSTORE=1", "FDNAME=echo"]
        store = FdStore()
        assert store.apply(message) is None
        host, port = sock.getsockname()
        # The next process gets it back and takes it instead of binding.
        script = (
            "import socket, sys; from shared import notify; "
            f"s = notify.listening_socket('echo', socket.SOCK_STREAM, '{host}', {port}); "
            "s.setblocking(True); c, _ = s.accept(); c.sendall(b'kept'); c.close()"
        )
        start = ChildStart(env={"PYTHONPATH": str(REPO)}, passed=store.passed())
        with start.reserved():
            child = subprocess.Popen(
                [sys.executable, "-c", script],
                env=None,
                pass_fds=start.pass_fds,
                preexec_fn=start.preexec,
            )
        sock.close()  # only the store's copy and the child's are left
        with socket.create_connection((host, port), timeout=10) as client:
            assert client.recv(10) == b"kept"
        assert child.wait(timeout=30) == 0
        store.close()
    finally:
        sock.close()
    # The child found its socket passed and stored nothing new.
    assert receiver.pending() is None
