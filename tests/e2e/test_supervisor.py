"""The six daemons under `zlayerctl daemon run`, driven only through zlayerctl and busctl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.supervisor import SupervisorState, find_executable
from shared.bus import DAEMONS
from shared.daemon import MALLOC_ARENA_MAX, OPTIMIZED_DAEMONS, PYTHON_OPTIMIZE
from shared.paths import PREFIX_ENV, Paths
from tests.conftest import (
    kill_prefix_processes,
    prefix_processes,
    remove_test_network,
    write_test_config,
)


def zlayerctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("zlayerctl"), *args], capture_output=True, text=True, timeout=timeout
    )


def status_rows() -> dict[str, dict[str, Any]]:
    result = zlayerctl("status", "--format", "json")
    return {row["name"]: row for row in json.loads(result.stdout)}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def left_running() -> Iterator[Paths]:
    """Six daemons for the tests that only look at them (they kill and stop nothing),
    started once for the module in a prefix of its own."""
    prefix = Path(f"/tmp/zlt-{os.getpid()}-m")
    prefix.mkdir()
    paths = Paths(prefix)
    write_test_config(paths, network_tag="zlm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PREFIX_ENV, str(prefix))
        patch.delenv("ZLAYER_BUS_ADDRESS", raising=False)
        started = zlayerctl("daemon", "run", "--detach")
        assert started.returncode == 0, started.stderr
        try:
            yield paths
        finally:
            stopped = zlayerctl("daemon", "stop")
            left = [f"{p.pid} {' '.join(p.cmdline())}" for p in prefix_processes(prefix)]
            kill_prefix_processes(prefix)
            remove_test_network(paths)
            shutil.rmtree(prefix, ignore_errors=True)
            assert stopped.returncode == 0, stopped.stderr
            assert not left, f"the module left these processes running: {left}"


@pytest.fixture
def looked_at(left_running: Paths, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """The module's daemons, zlayerctl pointed at them."""
    monkeypatch.setenv(PREFIX_ENV, str(left_running.prefix))
    monkeypatch.delenv("ZLAYER_BUS_ADDRESS", raising=False)
    return left_running


@pytest.fixture
def running(zlayer_prefix: Paths) -> Iterator[Paths]:
    """Six daemons of the test's own, for a test that kills them."""
    started = zlayerctl("daemon", "run", "--detach")
    assert started.returncode == 0, started.stderr
    try:
        yield zlayer_prefix
    finally:
        stopped = zlayerctl("daemon", "stop")
        assert stopped.returncode == 0, stopped.stderr


def test_six_daemons_run_and_answer(looked_at: Paths) -> None:
    result = zlayerctl("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for info in DAEMONS:
        assert f"zlayer-{info.name}" in result.stdout
    rows = status_rows()
    assert sorted(rows) == sorted(info.name for info in DAEMONS)
    for row in rows.values():
        assert row["state"] == "running"
        assert row["supervisor"] == "zlayerctl"
        assert row["version"]
        assert row["pid"] > 0
        code, body = http_get(row["metrics_url"])
        assert code == 200
        assert f'zlayer_build_info{{daemon="{row["name"]}"' in body

    address = (looked_at.bus_address_file).read_text().strip()
    tree = subprocess.run(
        ["busctl", f"--address={address}", "tree"], capture_output=True, text=True, check=True
    )
    for info in DAEMONS:
        assert info.object_path in tree.stdout

    port = rows["apid"]["detail"].rsplit(":", 1)[1]
    assert http_get(f"http://127.0.0.1:{port}/health/live")[0] == 200
    code, body = http_get(f"http://127.0.0.1:{port}/health/ready")
    assert code == 200, body
    assert json.loads(body)["status"] == "ready"


def test_each_daemon_has_two_malloc_arenas_and_counts_its_dropped_log_lines(
    looked_at: Paths,
) -> None:
    """As under the units: the supervisor limits the daemons' malloc arenas and runs the
    optimized ones with -OO, and every daemon's metrics say how many log lines a stuck
    log cost it (none here)."""
    wanted = os.environ.get("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
    rows = status_rows()
    assert set(rows) >= OPTIMIZED_DAEMONS
    for name, row in rows.items():
        environ = Path(f"/proc/{row['pid']}/environ").read_bytes().split(b"\0")
        assert f"MALLOC_ARENA_MAX={wanted}".encode() in environ, name
        optimized = f"PYTHONOPTIMIZE={PYTHON_OPTIMIZE}".encode() in environ
        assert optimized == (name in OPTIMIZED_DAEMONS), name
        code, body = http_get(row["metrics_url"])
        assert code == 200 and "\nzlayer_log_records_dropped_total 0.0\n" in body, name


# Native libraries a lone node's daemons have no use for until the node joins a
# cluster (gRPC, etcd's client, the PKI) or turns the mesh on (X25519): loaded at the
# first use, they would otherwise take about 30 MB of the six's idle memory.
NOT_LOADED_ALONE = {
    "schedd": ("grpc/_cython", "cryptography/hazmat/bindings"),
    # apid: nor cryptography before its first token is made or checked
    "apid": ("grpc/_cython", "cryptography/hazmat/bindings"),
    "overlayd": ("grpc/_cython", "cryptography/hazmat/bindings"),
}


def test_a_lone_nodes_daemons_do_not_load_the_cluster_libraries(looked_at: Paths) -> None:
    # nor for the question every logs and exec asks schedd first: which nodes there are
    listed = zlayerctl("node", "ls")
    assert listed.returncode != 0 and "this node is not in a cluster" in listed.stderr, listed
    rows = status_rows()
    for name, libraries in NOT_LOADED_ALONE.items():
        maps = Path(f"/proc/{rows[name]['pid']}/maps").read_text()
        loaded = [library for library in libraries if library in maps]
        assert not loaded, f"zlayer-{name} loaded {loaded} on a lone node"


def test_a_killed_daemon_is_restarted(running: Paths) -> None:
    for info in DAEMONS:
        old_pid = status_rows()[info.name]["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def back(name: str = info.name, old: int = old_pid) -> bool:
            row = status_rows()[name]
            return row["state"] == "running" and row["pid"] not in (0, old)

        wait_until(back, 20, f"zlayer-{info.name} to come back")
    assert zlayerctl("status").returncode == 0
    record = SupervisorState.read(running)
    assert record is not None
    assert all(child.restarts == 1 for child in record.daemons.values())


def test_a_killed_bus_is_restarted_and_daemons_reconnect(running: Paths) -> None:
    record = SupervisorState.read(running)
    assert record is not None
    os.kill(record.bus_pid, signal.SIGKILL)

    def all_running() -> bool:
        rows = status_rows()
        return all(row["state"] == "running" for row in rows.values())

    wait_until(all_running, 40, "all six daemons to run on the restarted bus")


def test_stop_leaves_nothing_behind(zlayer_prefix: Paths) -> None:
    assert zlayerctl("daemon", "run", "--detach").returncode == 0
    stopped = zlayerctl("daemon", "stop")
    assert stopped.returncode == 0, stopped.stderr
    for leftover in (
        zlayer_prefix.supervisor_state,
        zlayer_prefix.bus_address_file,
        zlayer_prefix.bus_socket,
        zlayer_prefix.run_dir / "notify.sock",
    ):
        assert not leftover.exists(), leftover
    # zlayer_prefix fails the test if any process of this prefix survived


def test_foreground_run_stops_everything_on_ctrl_c(zlayer_prefix: Paths) -> None:
    process = subprocess.Popen(
        [find_executable("zlayerctl"), "daemon", "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def ready() -> bool:
            state = SupervisorState.read(zlayer_prefix)
            return state is not None and state.ready

        wait_until(ready, 60, "the foreground supervisor to be ready")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "six daemons ready" in err
    assert "Traceback" not in err
    assert not zlayer_prefix.supervisor_state.exists()


def test_second_run_is_refused(looked_at: Paths) -> None:
    again = zlayerctl("daemon", "run", "--detach")
    assert again.returncode == 1
    assert "already running" in again.stderr
    assert "Traceback" not in again.stderr


def test_status_and_stop_without_daemons_are_one_sentence(zlayer_prefix: Paths) -> None:
    status = zlayerctl("status")
    assert status.returncode == 3
    assert "zlayerctl daemon run" in status.stderr
    assert "Traceback" not in status.stderr
    stop = zlayerctl("daemon", "stop")
    assert stop.returncode == 1
    assert "no ZLayer supervisor is running" in stop.stderr
