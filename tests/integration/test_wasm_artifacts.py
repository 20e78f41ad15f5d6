"""WASM artifacts end to end: ``zlayerctl wasm`` on real binaries, registryd on a private bus,
and pushes to a real Distribution registry (Debian's docker-registry) on a free port.

The binaries are compiled from WAT by wasmtime in the test; the registry is
started and stopped by PID here; every check looks at what a user sees
(exit codes, output, the pushed manifest) or at the store itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.supervisor import find_executable
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from shared.wasm_artifact import WASM_CONFIG_MEDIA_TYPE, WASM_FILE, WASM_LAYER_MEDIA_TYPE
from shared.wire import decode
from shared.wire.registry import WasmArtifact
from tests.integration.test_daemon import NotifyListener, stop
from tests.integration.test_registryd import Registryd
from tests.registry_fixture import (
    PASSWORD,
    USER,
    free_port,
    htpasswd_auth,
    need_tools,
    start_registry,
)
from tests.unit.test_wasm import COMPONENT_WAT, HELLO_MODULE_WAT, ILL_TYPED_WAT, compile_wat


@pytest.fixture
def binaries() -> Iterator[dict[str, Path]]:
    """A WASI p1 module, a WASI p2 component and some files that are not valid WebAssembly."""
    with tempfile.TemporaryDirectory(prefix="zlwasm-") as name:
        root = Path(name)
        module = compile_wat(HELLO_MODULE_WAT)
        files = {
            "module": module,
            "component": compile_wat(COMPONENT_WAT),
            "text": b"#!/bin/sh\necho not wasm\n",
            "truncated": module[:-7],
            "ill-typed": compile_wat(ILL_TYPED_WAT),
        }
        paths = {}
        for key, data in files.items():
            paths[key] = root / f"{key}.wasm"
            paths[key].write_bytes(data)
        paths["dir"] = root
        yield paths


def zlayerctl(
    *args: str, bus: PrivateBus | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    if bus is not None:
        environ["ZLAYER_BUS_ADDRESS"] = bus.address
    result = subprocess.run(
        [find_executable("zlayerctl"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
        cwd=cwd,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    return message.removeprefix("error: ")


# ---------------------------------------------------------------- no daemon needed


def test_validate_and_info_from_the_command_line(binaries: dict[str, Path]) -> None:
    module, component = str(binaries["module"]), str(binaries["component"])
    result = zlayerctl("wasm", "validate", module)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{module}: valid module, 4 imports, 4 exports, WASI preview1\n"
    result = zlayerctl("wasm", "validate", component, "--kind", "component")
    assert result.stdout == f"{component}: valid component, 2 imports, 1 export, WASI preview2\n"

    table = zlayerctl("wasm", "info", module).stdout
    assert "WASI:" in table and "preview1 (wasi_snapshot_preview1)" in table
    assert "wasi_snapshot_preview1.fd_write" in table and "func(i32, i32, i32, i32) -> i32" in table
    info = json.loads(zlayerctl("wasm", "info", component, "--format", "json").stdout)
    assert info["kind"] == "component" and info["wasi"] == "preview2"
    assert [i["name"] for i in info["imports"]] == ["wasi:cli/environment@0.2.0", "log"]
    assert [e["name"] for e in info["exports"]] == ["run"]


def test_bad_binaries_get_one_sentence(binaries: dict[str, Path]) -> None:
    def path(key: str) -> str:
        return str(binaries[key])

    assert one_sentence(zlayerctl("wasm", "validate", path("text"))) == (
        f"{path('text')} is not WebAssembly: it does not start with the \\0asm magic"
    )
    assert one_sentence(zlayerctl("wasm", "info", path("truncated"))).startswith(
        f"{path('truncated')} is truncated WebAssembly: the "
    )
    assert one_sentence(zlayerctl("wasm", "validate", path("ill-typed"))).startswith(
        f"{path('ill-typed')} is not valid WebAssembly: type mismatch"
    )
    assert one_sentence(zlayerctl("wasm", "validate", path("component"), "--kind", "module")) == (
        f"{path('component')} is a component, but a core module is expected here"
    )
    missing = str(binaries["dir"] / "missing.wasm")
    assert one_sentence(zlayerctl("wasm", "info", missing)) == f"{missing} does not exist"
    folder = str(binaries["dir"])
    assert one_sentence(zlayerctl("wasm", "validate", folder)) == (
        f"{folder} is a directory, not a WebAssembly file"
    )


# ---------------------------------------------------------------- registryd


@pytest.fixture
def registryd(zlayer_prefix: Paths, private_bus: PrivateBus) -> Iterator[Registryd]:
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    daemon = Registryd(zlayer_prefix, private_bus, listener)
    try:
        daemon.start()
        yield daemon
        daemon.stop()
    finally:
        if daemon.process is not None:
            stop(daemon.process)
        listener.close()


@pytest.mark.parametrize(("kind", "os_name"), [("module", "wasip1"), ("component", "wasip2")])
def test_export_import_and_ensure_say_runtime_wasm(
    registryd: Registryd, binaries: dict[str, Path], kind: str, os_name: str
) -> None:
    layout = binaries["dir"] / "hello.oci"
    exported = registryd.ok(
        "wasm", "export", str(binaries[kind]), "--name", "localhost/hello:1",
        "--output", str(layout), "--author", "tests", "--format", "json",
    )  # fmt: skip
    artifact = decode(exported, WasmArtifact)
    assert (artifact.kind, artifact.os, artifact.location) == (kind, os_name, str(layout))
    index = json.loads((layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs/sha256" / manifest_hex).read_text())
    assert manifest["config"]["mediaType"] == WASM_CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [WASM_LAYER_MEDIA_TYPE]

    info = registryd.import_(layout)
    assert info.names == ["localhost/hello:1"] and info.runtime == "wasm"
    detail = json.loads(registryd.ok("image", "inspect", "localhost/hello:1", "--format", "json"))
    assert detail["image"]["runtime"] == "wasm" and detail["image"]["is_wasm"] is True
    assert (detail["image"]["architecture"], detail["image"]["os"]) == ("wasm", os_name)
    rootfs = registryd.ensure("localhost/hello:1")
    assert rootfs.image.runtime == "wasm"
    (layer_dir,) = rootfs.lower_dirs
    assert os.listdir(layer_dir) == [WASM_FILE]
    assert (Path(layer_dir) / WASM_FILE).read_bytes() == binaries[kind].read_bytes()

    registryd.ok("image", "rm", "localhost/hello:1")
    registryd.assert_empty()


def test_container_images_stay_runtime_oci(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    assert registryd.import_(busybox_image["oci"]).runtime == "oci"
    assert registryd.ensure("zlayer/busybox").image.runtime == "oci"


def test_export_refusals_are_sentences_and_leave_nothing(
    registryd: Registryd, binaries: dict[str, Path]
) -> None:
    out = binaries["dir"] / "out.oci"

    def export(key: str, *extra: str) -> str:
        return one_sentence(
            zlayerctl(
                "wasm", "export", str(binaries[key]), "--output", str(out), *extra,
                bus=registryd.bus,
            )
        )  # fmt: skip

    assert export("truncated", "--name", "a:1").startswith(
        f"{binaries['truncated']} is truncated WebAssembly"
    )
    assert export("text", "--name", "a:1").endswith("does not start with the \\0asm magic")
    assert "names a digest" in export("module", "--name", "a@sha256:" + "b" * 64)
    assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("mine")
    assert export("module", "--name", "a:1") == (
        f"{out} already exists and is not an empty directory; choose another output"
    )
    assert os.listdir(out) == ["keep"]
    assert sorted(p.name for p in binaries["dir"].iterdir() if p.name.startswith(".")) == []
    assert os.listdir(registryd.store / "tmp") == []

    # Without --output the layout lands beside the working directory, named after the file.
    result = zlayerctl(
        "wasm", "export", str(binaries["module"]), "--name", "a:1", bus=registryd.bus,
        cwd=binaries["dir"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (binaries["dir"] / "module.oci" / "index.json").is_file()


# ---------------------------------------------------------------- push


@pytest.fixture
def local_registry() -> Iterator[str]:
    """A Distribution registry on 127.0.0.1, plain HTTP; its host:port."""
    need_tools("skopeo")
    server = start_registry()
    try:
        yield server.host
    finally:
        server.stop()


@pytest.fixture
def basic_registry() -> Iterator[str]:
    """A registry asking for a user name and password (htpasswd); its host:port."""
    with tempfile.TemporaryDirectory(prefix="zlhtpasswd-") as name:
        server = start_registry(htpasswd_auth(Path(name)))
        try:
            yield server.host
        finally:
            server.stop()


def skopeo_json(*args: str) -> Any:
    result = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_push_to_a_real_registry_and_back(
    registryd: Registryd, binaries: dict[str, Path], local_registry: str
) -> None:
    reference = f"{local_registry}/wasm/hello:1"
    pushed = registryd.ok(
        "wasm", "push", str(binaries["component"]), reference, "--no-tls-verify",
        "--format", "json",
    )  # fmt: skip
    artifact = decode(pushed, WasmArtifact)
    assert artifact.location == reference and artifact.os == "wasip2"

    manifest = skopeo_json("--raw", f"docker://{reference}")
    assert manifest["config"]["mediaType"] == WASM_CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [WASM_LAYER_MEDIA_TYPE]
    assert manifest["layers"][0]["digest"] == artifact.layer_digest
    config = skopeo_json("--config", "--raw", f"docker://{reference}")
    assert (config["architecture"], config["os"]) == ("wasm", "wasip2")
    assert config["layerDigests"] == [artifact.layer_digest]
    assert config["component"]["imports"] == ["wasi:cli/environment@0.2.0", "log"]

    # What the registry hands back is recognised as a WASM image.
    copied = binaries["dir"] / "copied.oci"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}",
         f"oci:{copied}:1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    info = registryd.import_(copied, "--name", "localhost/back:1")
    assert info.runtime == "wasm" and info.manifest_digest == artifact.manifest_digest
    assert os.listdir(registryd.store / "tmp") == []


def test_push_failures_are_sentences(
    registryd: Registryd, binaries: dict[str, Path], basic_registry: str
) -> None:
    module = str(binaries["module"])
    closed = f"127.0.0.1:{free_port()}"
    assert (
        one_sentence(
            zlayerctl(
                "wasm", "push", module, f"{closed}/hello:1", "--no-tls-verify", bus=registryd.bus
            )
        )
        == f"cannot reach registry {closed}: connection refused"
    )
    assert one_sentence(
        zlayerctl("wasm", "push", str(binaries["text"]), f"{basic_registry}/x:1", bus=registryd.bus)
    ).endswith("does not start with the \\0asm magic")
    refused = one_sentence(
        zlayerctl("wasm", "push", module, f"{basic_registry}/hello:1", bus=registryd.bus)
    )
    assert basic_registry in refused and "zlayerctl login" in refused
    assert os.listdir(registryd.store / "tmp") == []


def test_push_uses_the_credentials_of_zlayerctl_login(
    registryd: Registryd, binaries: dict[str, Path], basic_registry: str
) -> None:
    registryd.ok("login", basic_registry, "-u", USER, "-p", PASSWORD)
    reference = f"{basic_registry}/wasm/hello:2"
    pushed = registryd.ok("wasm", "push", str(binaries["module"]), reference, "--format", "json")
    artifact = decode(pushed, WasmArtifact)
    manifest = skopeo_json("--raw", "--creds", f"{USER}:{PASSWORD}", f"docker://{reference}")
    assert manifest["layers"][0]["digest"] == artifact.layer_digest
    assert artifact.os == "wasip1"
