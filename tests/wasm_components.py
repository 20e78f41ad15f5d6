"""WebAssembly components built from Python source once per test run.

componentize-py takes 20-60 s a build (it bundles CPython into each component),
so a test never builds one itself: it asks the session's ``wasm_components`` for
one of the components below, which is built the first time any test asks and
handed to every later one as the same file. A build is kept under the run's
pytest base temp, named by a digest of its sources, WIT files, world and
componentize-py version: a changed source is a new build, never a stale one.

The end-to-end run starts these builds (and their packing) in a thread of their own
as its first test begins (``prepare``), so they are done, on the core the daemons
leave idle, by the time the WebAssembly modules ask for them.

Few components, on purpose: wasmtime compiles each distinct one again on every
node (a minute or more on two cores), so a test that needs "a wasi:http handler"
uses ``HTTP_TEST``, whose request path picks what it does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from shared.buildfile.wasm import find_componentize_py
from shared.paths import PREFIX_ENV

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "wasm-http"
DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Component:
    """What componentize-py builds: ``module`` (found on ``paths``) for ``world`` of ``wit``."""

    name: str
    module: str
    paths: tuple[Path, ...]
    wit: Path
    world: str


# A wasi:http handler: ``/read`` reads the whole body, then answers "read N bytes"; any
# other path is the example's handler ("hello from wasm").
HTTP_TEST = Component(
    "http-test", "testapp", (DATA / "wasm-http-test", EXAMPLE), EXAMPLE / "wit", "proxy"
)
# A WASI command that connects over TCP or sends over UDP (its docstring says how).
NET_CLIENT = Component(
    "netclient", "app", (DATA / "wasm-netclient",), EXAMPLE / "wit", "wasi:cli/command@0.2.8"
)
# The names the end-to-end tests import them as (the name is packed into the layout).
HTTP_TEST_IMAGE = "localhost/wasm-http-test:1"
NET_CLIENT_IMAGE = "localhost/wasm-netclient:1"


def componentize_py() -> str:
    """componentize-py's path; the test is skipped where it is not installed."""
    found = find_componentize_py()
    if not found:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    return found


@functools.cache
def componentize_py_version(tool: str) -> str:
    done = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path


def build_key(component: Component, tool: str) -> str:
    """A digest of everything the build reads: sources, WIT, world, module, tool version."""
    hasher = hashlib.sha256()
    for part in (component.module, component.world, componentize_py_version(tool)):
        hasher.update(part.encode() + b"\0")
    for root in (*component.paths, component.wit):
        for path in _files(root):
            hasher.update(f"{path.relative_to(root)}\0".encode())
            hasher.update(hashlib.sha256(path.read_bytes()).digest())
    return hasher.hexdigest()


def _tool_env() -> dict[str, str]:
    """The environment of a build: none of a test's prefix or bus, so a build still
    running when a test ends is not taken for a process that test left behind."""
    return {k: v for k, v in os.environ.items() if k not in (PREFIX_ENV, "ZLAYER_BUS_ADDRESS")}


class WasmComponents:
    """The run's components: built on first ask into ``root``, the same file after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.builds: list[str] = []  # the components this run built, in order
        self._locks: dict[Path, threading.Lock] = {}  # one per file: built or packed once
        self._locks_lock = threading.Lock()
        self._ahead: threading.Thread | None = None
        self._running: subprocess.Popen[str] | None = None
        self._closing = False

    def _lock(self, target: Path) -> threading.Lock:
        """The lock of ``target``: a test asking for a file being made ahead waits for it,
        and one asking for another file does not wait behind it."""
        with self._locks_lock:
            return self._locks.setdefault(target, threading.Lock())

    def _run(self, command: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
        """``command``'s exit status and output; a child of ours, killed by :meth:`close`."""
        if self._closing:
            return -1, "the test run is ending"
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=cwd, env=_tool_env(),
        ) as process:  # fmt: skip
            self._running = process
            try:
                out, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
                return -1, f"{out}\n(killed after {timeout:.0f}s)"
            finally:
                self._running = None
            return process.returncode, out

    def get(self, component: Component) -> Path:
        tool = componentize_py()
        key = build_key(component, tool)
        target = self.root / f"{component.name}-{key[:16]}.wasm"
        with self._lock(target):
            if target.is_file():
                return target
            self.root.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.partial")
            command = [tool, "-d", str(component.wit), "-w", component.world, "componentize",
                       component.module, *(a for p in component.paths for a in ("-p", str(p))),
                       "-o", str(partial)]  # fmt: skip
            try:
                code, out = self._run(command, timeout=300, cwd=self.root)
                assert code == 0, f"componentize-py could not build {component.name}: {out}"
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            self.builds.append(component.name)
            return target

    def layout(self, component: Component, reference: str) -> Path:
        """The component packed by ``zlayerctl wasm export`` as ``reference``: an OCI
        layout to ``image import`` on any node. Packing reads the whole component
        (tens of seconds on a busy machine), so it too is done once per run."""
        module = self.get(component)
        name = hashlib.sha256(reference.encode()).hexdigest()[:16]
        target = module.with_name(f"{module.stem}-{name}.oci")
        with self._lock(target):
            if (target / "index.json").is_file():
                return target
            partial = module.with_name(f"{target.name}.{os.getpid()}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                code, out = self._run(
                    [find_executable("zlayerctl"), "wasm", "export", str(module), "--name",
                     reference, "--output", str(partial)],
                    timeout=600,
                )  # fmt: skip
                assert code == 0, f"zlayerctl wasm export {component.name}: {out}"
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return target

    def prepare(self, wanted: list[tuple[Component, str]]) -> None:
        """Build and pack ``wanted`` (component, image name) in a thread of their own,
        for the tests that will ask. A failure there is left for the test that asks
        to meet: it builds again itself and reports its own error."""
        if self._ahead is not None or find_componentize_py() is None:
            return

        def ahead() -> None:
            for component, reference in wanted:
                try:
                    self.layout(component, reference)
                except BaseException:  # the asking test builds again and reports why
                    continue

        self._ahead = threading.Thread(target=ahead, name="wasm-components", daemon=True)
        self._ahead.start()

    def close(self) -> None:
        """At the run's end: a build still under way is stopped (by its PID, ours)."""
        self._closing = True
        running = self._running
        if running is not None and running.poll() is None:
            running.kill()
        if self._ahead is not None:
            self._ahead.join(timeout=60)


@pytest.fixture(scope="session")
def wasm_components(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WasmComponents]:
    components = WasmComponents(tmp_path_factory.getbasetemp() / "wasm-components")
    yield components
    components.close()
