"""WebAssembly images compile as they arrive: registryd signals each image it stores,
and agentd compiles a WebAssembly one into its compile cache at once, before any
deployment names it.

A real registryd and a real agentd on a private bus; the modules are built from
WAT here, imported with ``zlayerctl image import`` or pushed to a real
Distribution registry and pulled with ``zlayerctl pull``. The cache entry is
checked to be the very one a replica's start looks up, and to run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from daemons.agentd import wasm
from shared.busybox_image import Entry, make_image, make_tar, write_oci_layout
from shared.paths import Paths
from shared.spec import load_spec
from tests.integration.test_daemon import NotifyListener, start, stop
from tests.integration.test_registryd import Registryd
from tests.integration.test_wasm_artifacts import registryd
from tests.registry_fixture import skopeo_copy, start_registry

__all__ = ["registryd"]  # the fixture

pytestmark = pytest.mark.timeout(180)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A WASIp1 command: writes its line to fd 1 and exits with its code.
COMMAND = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "LINE")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const LENGTH))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const CODE))))
"""


def command_module(path: Path, line: str, code: int) -> Path:
    text = COMMAND.replace("LINE", line + "\\n").replace("LENGTH", str(len(line) + 1))
    path.write_bytes(bytes(wasmtime.wat2wasm(text.replace("CODE", str(code)))))
    return path


class Agentd:
    def __init__(self, paths: Paths, process: subprocess.Popen[str]) -> None:
        self.state = paths.daemon_state("agentd")
        self.process = process

    def cached(self) -> set[Path]:
        return set(wasm.cache_dir(self.state).glob("*.cwasm"))


@pytest.fixture
def agentd(registryd: Registryd) -> Iterator[Agentd]:
    listener = NotifyListener(registryd.paths.prefix / "agentd-notify.sock")
    process = start("agentd", registryd.bus, listener)
    try:
        listener.wait_for("READY=1", timeout=60)
        yield Agentd(registryd.paths, process)
        code, err = stop(process)
        assert code == 0, err
        assert "Traceback" not in err, err
    finally:
        if process.poll() is None:
            stop(process)
        listener.close()


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s"
        time.sleep(0.1)
    return found


def export(registryd: Registryd, module: Path, name: str) -> Path:
    layout = module.with_suffix(".oci")
    registryd.ok("wasm", "export", str(module), "--name", name, "--output", str(layout))
    return layout


def runs_precompiled(compiled: Path, tools: Path) -> tuple[str, int]:
    """What the real ``wasmtime run`` of a compiled module prints and exits with."""
    ran = subprocess.run(
        [str(wasm.wasmtime(tools).path), "run", "--allow-precompiled", str(compiled)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    return ran.stdout, ran.returncode


def test_an_imported_wasm_image_is_compiled_with_no_deployment(
    registryd: Registryd, agentd: Agentd, tmp_path: Path
) -> None:
    assert agentd.cached() == set()
    module = command_module(tmp_path / "hello.wasm", "compiled ahead", 7)
    registryd.ok("image", "import", str(export(registryd, module, "localhost/ahead:1")))
    (entry,) = wait_until(agentd.cached, 60, "compiled module in agentd's cache")
    assert not list(entry.parent.glob("*.partial"))  # finished, not under way
    # It is the entry a replica's start looks up (nothing is compiled then), and it runs.
    rootfs = registryd.ensure("localhost/ahead:1")
    looked_up = wasm.precompiled(
        wasm.wasmtime(tmp_path / "bin"),
        wasm.module_path(rootfs),
        wasm.codegen_flags([]),
        wasm.cache_dir(agentd.state),
    )
    assert looked_up == entry
    assert runs_precompiled(entry, tmp_path / "bin") == ("compiled ahead\n", 7)

    # The same module under another name is the same entry: nothing more is compiled.
    registryd.ok("image", "import", str(tmp_path / "hello.oci"), "--name", "localhost/ahead:2")
    time.sleep(2)
    assert agentd.cached() == {entry}
    registryd.ok("image", "rm", "localhost/ahead:1")
    registryd.ok("image", "rm", "localhost/ahead:2")


# A component exporting wasi:http/incoming-handler (with nothing behind it: only its
# shape matters here).
HTTP_COMPONENT = r"""
(component
  (core module $m (func (export "handle")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "handle")))
  (instance $h (export "handle" (func $f)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $h)))
"""


def test_a_wasi_http_component_compiles_as_its_service_will_start_it(
    registryd: Registryd, agentd: Agentd, tmp_path: Path
) -> None:
    component = tmp_path / "http.wasm"
    component.write_bytes(bytes(wasmtime.wat2wasm(HTTP_COMPONENT)))
    registryd.ok("image", "import", str(export(registryd, component, "localhost/wasm-http:1")))
    (entry,) = wait_until(agentd.cached, 60, "compiled component in agentd's cache")
    # The example's wasm_http service (no fuel): the flags its replica's start compiles with.
    spec = load_spec(EXAMPLES / "wasm-http.zlayer.yml").services["hello"]
    flags = wasm.limit_flags(spec) + wasm.serve_flags(spec)
    rootfs = registryd.ensure("localhost/wasm-http:1")
    looked_up = wasm.precompiled(
        wasm.wasmtime(tmp_path / "bin"),
        wasm.module_path(rootfs),
        wasm.codegen_flags(flags),
        wasm.cache_dir(agentd.state),
    )
    assert looked_up == entry and agentd.cached() == {entry}
    registryd.ok("image", "rm", "localhost/wasm-http:1")


def wasm_platform_image(module: bytes, name: str, layout: Path) -> Path:
    """An image of the wasm platform (architecture wasm, os wasip1) whose tar layer holds
    the module its entrypoint names, as runwasi-style images are."""
    image = make_image(
        [make_tar([Entry("hello.wasm", data=module)])], name=name, Entrypoint=["/hello.wasm"]
    )
    image.config.update(architecture="wasm", os="wasip1")
    return write_oci_layout(image, layout)


def test_a_pulled_wasm_image_is_compiled_and_a_container_image_is_not(
    registryd: Registryd, agentd: Agentd, tmp_path: Path, busybox_image: dict[str, Path]
) -> None:
    server = start_registry()
    try:
        reference = f"{server.host}/wasm/ahead:1"
        module = command_module(tmp_path / "pulled.wasm", "pulled and compiled", 3)
        layout = wasm_platform_image(module.read_bytes(), reference, tmp_path / "layout")
        skopeo_copy(f"oci:{layout}", f"docker://{reference}")
        registryd.ok("image", "import", str(busybox_image["oci"]))
        time.sleep(2)
        assert agentd.cached() == set()  # a container image compiles nothing
        registryd.ok("pull", reference)
        (entry,) = wait_until(agentd.cached, 60, "compiled module in agentd's cache")
        assert runs_precompiled(entry, tmp_path / "bin") == ("pulled and compiled\n", 3)
    finally:
        server.stop()
    for image in registryd.images():
        registryd.ok("image", "rm", image["id"])


def test_a_pulled_wasm_artifact_is_compiled(
    registryd: Registryd, agentd: Agentd, tmp_path: Path
) -> None:
    server = start_registry()
    try:
        reference = f"{server.host}/wasm/artifact:1"
        module = command_module(tmp_path / "artifact.wasm", "an artifact, pulled", 0)
        # A push sends the file: nothing is stored here, so nothing compiles yet.
        registryd.ok("wasm", "push", str(module), reference, "--no-tls-verify")
        time.sleep(1)
        assert agentd.cached() == set()
        pulled = registryd.ctl("pull", reference)
        if pulled.returncode == 0:
            (entry,) = wait_until(agentd.cached, 60, "compiled module in agentd's cache")
            assert runs_precompiled(entry, tmp_path / "bin") == ("an artifact, pulled\n", 0)
    finally:
        server.stop()
        for image in registryd.images():
            registryd.ok("image", "rm", image["id"])
    assert pulled.returncode == 0, pulled.stderr


def test_images_stored_while_agentd_was_down_compile_at_its_start(
    registryd: Registryd, tmp_path: Path
) -> None:
    module = command_module(tmp_path / "early.wasm", "stored before agentd", 0)
    registryd.ok("image", "import", str(export(registryd, module, "localhost/early:1")))
    listener = NotifyListener(registryd.paths.prefix / "agentd-notify.sock")
    process = start("agentd", registryd.bus, listener)
    try:
        listener.wait_for("READY=1", timeout=60)
        state = registryd.paths.daemon_state("agentd")
        (entry,) = wait_until(
            lambda: list(wasm.cache_dir(state).glob("*.cwasm")), 60, "compiled module"
        )
        assert runs_precompiled(entry, tmp_path / "bin") == ("stored before agentd\n", 0)
        code, err = stop(process)
        assert code == 0 and "Traceback" not in err, err
    finally:
        if process.poll() is None:
            stop(process)
        listener.close()
    registryd.ok("image", "rm", "localhost/early:1")
    assert os.listdir(registryd.store / "tmp") == []


def compiling(cache: Path) -> list[str]:
    """The command lines of running processes that write into ``cache``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.startswith(str(cache)) for arg in argv):
            found.append(" ".join(argv))
    return found


def test_agentd_stops_at_once_in_the_middle_of_a_compile(
    registryd: Registryd, agentd: Agentd, tmp_path: Path
) -> None:
    """A large module compiles for many seconds: stopping agentd stops that compile
    (its wasmtime child) instead of waiting for it."""
    body = "(local.get 0) " + "(i32.const 7) (i32.mul) (i32.const 3) (i32.add) " * 200
    functions = "\n".join(
        f'(func (export "f{n}") (param i32) (result i32) {body})' for n in range(3000)
    )
    big = tmp_path / "big.wasm"
    big.write_bytes(bytes(wasmtime.wat2wasm(f'(module (func (export "_start")) {functions})')))
    registryd.ok("image", "import", str(export(registryd, big, "localhost/big:1")))
    cache = wasm.cache_dir(agentd.state)
    wait_until(lambda: compiling(cache), 60, "compile under way")
    started = time.monotonic()
    code, err = stop(agentd.process)
    assert code == 0 and "Traceback" not in err, err
    assert time.monotonic() - started < 8
    assert compiling(cache) == [] and agentd.cached() == set()
    registryd.ok("image", "rm", "localhost/big:1")
