"""Fixtures shared by every test layer.

- ``zlayer_prefix``: a private path prefix per test (config, state, run and
  log dirs under tmp), with every daemon's ports set to "pick a free one",
  so tests never see each other's state or collide on ports.
- ``private_bus``: a real dbus-daemon of the test's own.
- ``leak_check``: fails an integration or end-to-end test that leaves a
  process, mount, link, network namespace, nft table or cgroup behind.
- ``shared_node_of``: a node (six daemons) several modules share, started by the
  first module that asks for it and stopped after the last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import pytest

from shared.bus import DAEMONS
from shared.busdaemon import PrivateBus
from shared.paths import PREFIX_ENV, Paths

# gRPC's fork handlers (on by default in grpcio) run at every fork of this
# process once an etcd test has loaded it: a fork made while its threads are
# busy can leave the child stuck before exec (a daemon that never said
# READY=1, its log one "epoll_wait error: Bad file descriptor") and can break
# the parent's open streams. No fork of the tests uses gRPC: most exec at once,
# and those that go on in Python (pyroute2's, multiprocessing's) never touch it.
# The daemons the tests start inherit the setting; it changes nothing for them,
# as they start their tools with vfork, which runs no fork handlers.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

_RUN_PID = os.getpid()


def _ended_if_a_fork() -> bool:
    """A fork of the run (pyroute2's namespace helpers, multiprocessing) inherits the
    handlers below: it ends as SIGTERM ends it, not by running the tests' teardown."""
    if os.getpid() == _RUN_PID:
        return False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    return True


def _terminated(_signum: int, _frame: object) -> None:
    if _ended_if_a_fork():
        return
    # Once: a second SIGTERM must not cut the clean-up the first one started. A handler
    # that does nothing, not SIG_IGN: an ignored signal stays ignored across exec, in every
    # process the clean-up starts, which then could not be stopped with SIGTERM.
    signal.signal(signal.SIGTERM, _already_stopping)
    raise KeyboardInterrupt


def _already_stopping(_signum: int, _frame: object) -> None:
    _ended_if_a_fork()


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (CI's time limit, scripts/test.sh ending a lane) ends as
    Ctrl-C does: pytest runs every fixture's teardown, so the daemons, clusters and
    package machines the tests started are stopped and removed, not left running."""
    signal.signal(signal.SIGTERM, _terminated)


REPO = Path(__file__).resolve().parent.parent


def write_test_config(paths: Paths, *, network_tag: str = "zlt") -> None:
    """Free ports for every daemon, so parallel runs never collide, and a node
    network of the test's own: never the real ``zlayer0`` and never 10.88/16
    (podman's and buildah's default)."""
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    for info in DAEMONS:
        extra = "http_port = 0\n" if info.name == "apid" else ""
        if info.name == "overlayd":
            pid = os.getpid()
            # One second octet per tag: a test's own node ("zln") runs beside the
            # module's ("zle") in the same process, and must not share its subnet.
            third = {"zle": 241, "zln": 243, "zlm": 244, "zlh": 245}.get(network_tag, 242)
            extra = (
                f'bridge = "{network_tag}{pid % 100000}"\nsubnet = "10.{third}.{pid % 250}.0/24"\n'
            )
        paths.daemon_config(info.name).write_text(f"metrics_port = 0\n{extra}")


def remove_test_network(paths: Paths) -> None:
    """Take down the bridge, nft table and IPAM an overlayd of this prefix made."""
    from ctl.supervisor import find_executable

    if not network_made(paths):
        return
    subprocess.run(
        [find_executable("zlayer-overlayd"), "--remove-network"],
        env={**os.environ, PREFIX_ENV: str(paths.prefix)},
        capture_output=True,
        timeout=60,
        check=False,
    )


def network_made(paths: Paths) -> bool:
    """Whether an overlayd of this prefix may have made a network: one that made
    anything made its bridge first (the nft table, attachments and host settings come
    after), or wrote its state directory. Most tests never start overlayd, and asking
    ``--remove-network`` costs a daemon's start-up at each test's end."""
    if paths.daemon_state("overlayd").exists():
        return True
    from daemons.overlayd.settings import OverlaySettings

    try:
        bridge = OverlaySettings.load("overlayd", paths).bridge
    except Exception:  # a test's own broken settings: let overlayd itself decide
        return True
    return Path("/sys/class/net", bridge).exists()


@pytest.fixture
def zlayer_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    # Unix socket paths are limited to 108 bytes: keep the prefix short.
    prefix = Path(f"/tmp/zlt-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    prefix.mkdir()
    paths = Paths(prefix)
    write_test_config(paths)
    monkeypatch.setenv(PREFIX_ENV, str(prefix))
    monkeypatch.delenv("ZLAYER_BUS_ADDRESS", raising=False)
    yield paths
    left = [f"{p.pid} {' '.join(p.cmdline())}" for p in prefix_processes(prefix)]
    kill_prefix_processes(prefix)
    remove_test_network(paths)
    shutil.rmtree(prefix, ignore_errors=True)
    assert not left, f"the test left these processes running: {left}"


def prefix_processes(prefix: Path) -> list[psutil.Process]:
    """Processes started for this prefix: they carry ZLAYER_PREFIX=<prefix>."""
    wanted = f"{PREFIX_ENV}={prefix}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as handle:
                if wanted in handle.read().split(b"\0"):
                    found.append(proc)
        except OSError:
            continue
    return [p for p in found if p.pid != os.getpid()]


def kill_prefix_processes(prefix: Path) -> None:
    """Last-resort cleanup by PID of whatever a failed test left running."""
    for proc in prefix_processes(prefix):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)


@pytest.fixture
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus(Path(f"/tmp/zlb-{os.getpid()}-{time.monotonic_ns() % 10**9}.sock"))
    bus.start()
    yield bus
    bus.stop()


def _snapshot() -> dict[str, set[str]]:
    snap: dict[str, set[str]] = {}
    with open("/proc/self/mountinfo") as handle:
        snap["mounts"] = {line.split()[4] for line in handle}
    snap["links"] = set(os.listdir("/sys/class/net"))
    netns = Path("/run/netns")
    snap["netns"] = set(os.listdir(netns)) if netns.is_dir() else set()
    if shutil.which("nft"):
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        snap["nft tables"] = set(out.stdout.splitlines())
    cgroups: set[str] = set()
    for root in Path("/sys/fs/cgroup").glob("*"):
        # A cgroup another process removes while this walks it is simply not there.
        if root.is_dir():
            with contextlib.suppress(FileNotFoundError):
                cgroups.update(str(p) for p in root.glob("**/*zlayer*") if p.is_dir())
    snap["cgroups"] = cgroups
    return snap


@pytest.fixture
def leak_check() -> Iterator[None]:
    """Mounts, links, netns, nft tables and cgroups; processes are checked by
    ``zlayer_prefix``, which knows exactly which ones a test started."""
    before = _snapshot()
    yield
    after = _snapshot()
    leaks = {kind: sorted(after[kind] - before.get(kind, set())) for kind in after}
    leaks = {kind: items for kind, items in leaks.items() if items}
    assert not leaks, f"the test left these behind: {leaks}"


@pytest.fixture(scope="session")
def busybox_image() -> Iterator[dict[str, Path]]:
    """The busybox test image, built once: paths of its ``oci`` layout directory,
    its ``oci-archive`` and its ``docker-archive`` (``docker save``) tar."""
    from shared import busybox_image as builder

    if not builder.BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    out = Path(f"/tmp/zlimg-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    try:
        yield builder.write_all(builder.busybox_image(), out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------- nodes several modules share
#
# Six daemons take seconds to start and to stop: modules that leave a node as they
# found it share one node of each kind. It starts with the first module that asks
# for it (module-scoped, so before that test's leak check looks) and stops at the end
# of the last such module of the run.


@pytest.fixture(scope="session")
def _shared_nodes() -> Iterator[dict[str, tuple[ExitStack, Any]]]:
    started: dict[str, tuple[ExitStack, Any]] = {}
    yield started
    for stack, _ in started.values():  # a run cut short: whatever is still up
        stack.close()


def shared_node_of(
    request: pytest.FixtureRequest,
    started: dict[str, tuple[ExitStack, Any]],
    kind: str,
    start: Callable[[ExitStack], Any],
) -> Iterator[Any]:
    """The body of a module-scoped fixture yielding the node of ``kind``, started by
    ``start`` (which enters what must be closed on ``ExitStack``) if it is not up yet."""
    if kind not in started:
        stack = ExitStack()
        try:
            started[kind] = (stack, start(stack))
        except BaseException:
            stack.close()
            raise
    yield started[kind][1]
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.getparent(pytest.Module) is request.node]
    later = items[max(mine) + 1 :] if mine else []
    if not any(request.fixturename in item.fixturenames for item in later):
        stack, _ = started.pop(kind)
        stack.close()
