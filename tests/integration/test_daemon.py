"""One daemon on a real private bus, supervised through a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths


class NotifyListener:
    """The receiving end of sd_notify, as systemd would hold it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.messages:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {line!r} within {timeout}s; got {self.messages}"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.extend(data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def notify_listener(zlayer_prefix: Paths) -> Iterator[NotifyListener]:
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    yield listener
    listener.close()


def start(
    name: str,
    bus: PrivateBus,
    notify: NotifyListener | None,
    *,
    wrapper: tuple[str, ...] = (),
    **env: str,
) -> subprocess.Popen[str]:
    """The daemon as a child; ``wrapper`` runs it (and must exec it, keeping its PID)."""
    environ = dict(os.environ, ZLAYER_BUS_ADDRESS=bus.address, **env)
    if notify is not None:
        environ["NOTIFY_SOCKET"] = str(notify.path)
    return subprocess.Popen(
        [*wrapper, find_executable(f"zlayer-{name}")],
        env=environ,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str], signal_first: bool = True) -> tuple[int, str]:
    """SIGTERM (unless the process is expected to exit by itself), then collect."""
    if signal_first and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return process.returncode, err


def test_ready_watchdog_metrics_and_graceful_stop(
    zlayer_prefix: Paths, private_bus: PrivateBus, notify_listener: NotifyListener
) -> None:
    process = start("schedd", private_bus, notify_listener, WATCHDOG_USEC="200000")
    try:
        notify_listener.wait_for("READY=1")
        notify_listener.messages.clear()
        notify_listener.wait_for("WATCHDOG=1", timeout=2)
        status = subprocess.run(
            [
                "busctl",
                f"--address={private_bus.address}",
                "--json=short",
                "call",
                "org.zlayer.Scheduler1",
                "/org/zlayer/Scheduler1",
                "org.zlayer.Scheduler1",
                "Status",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert '"running"' in status.stdout and f"{process.pid}" in status.stdout
        url = next(part for part in status.stdout.split('"') if part.startswith("http://"))
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'zlayer_build_info{daemon="schedd"' in body
        assert "process_resident_memory_bytes" in body
    finally:
        code, err = stop(process)
    assert code == 0, err
    assert "STOPPING=1" in notify_listener.messages or _drain_has(notify_listener, "STOPPING=1")
    assert "Traceback" not in err


def _drain_has(listener: NotifyListener, line: str) -> bool:
    try:
        listener.wait_for(line, timeout=1)
    except AssertionError:
        return False
    return True


def test_bad_config_exits_78_with_one_sentence(
    zlayer_prefix: Paths, private_bus: PrivateBus
) -> None:
    zlayer_prefix.daemon_config("agentd").write_text("metrics_port = 'nine'\n")
    process = start("agentd", private_bus, None)
    code, err = stop(process, signal_first=False)
    assert code == 78
    assert "agentd.toml" in err and "metrics_port" in err
    assert "Traceback" not in err


def test_second_instance_refuses_the_taken_name(
    zlayer_prefix: Paths, private_bus: PrivateBus, notify_listener: NotifyListener
) -> None:
    first = start("registryd", private_bus, notify_listener)
    try:
        notify_listener.wait_for("READY=1")
        second = start("registryd", private_bus, None)
        code, err = stop(second, signal_first=False)
        assert code == 1
        assert "org.zlayer.Registry1" in err and "another zlayer-registryd" in err
        assert "Traceback" not in err
    finally:
        stop(first)


def test_exits_when_the_bus_goes_away(
    zlayer_prefix: Paths, private_bus: PrivateBus, notify_listener: NotifyListener
) -> None:
    process = start("proxyd", private_bus, notify_listener)
    try:
        notify_listener.wait_for("READY=1")
        private_bus.stop()
        process.wait(timeout=15)
    finally:
        code, err = stop(process)
    assert code == 1, err
    assert "lost the bus" in err


def test_no_bus_is_a_clear_sentence(zlayer_prefix: Paths) -> None:
    bus = PrivateBus(zlayer_prefix.prefix / "gone.sock")
    bus.address = f"unix:path={zlayer_prefix.prefix / 'gone.sock'}"
    process = start("overlayd", bus, None)
    code, err = stop(process, signal_first=False)
    assert code == 1
    assert "cannot connect" in err and "Traceback" not in err
