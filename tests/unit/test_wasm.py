"""shared.wasm and registryd's artifact code on real binaries compiled from WAT by wasmtime.

The section parser is checked against wasmtime's own view of the same
binaries (imports and exports by name), and every malformed input must end
in a WasmError sentence, never another exception.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import wasmtime
import wasmtime.component
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.registryd.sources import Source, SourceBlob, SourceImage
from daemons.registryd.wasm import image_runtime
from shared.bus import InvalidArgumentError
from shared.wasm import WasmError, inspect, validate
from shared.wasm_artifact import (
    WASM_CONFIG_MEDIA_TYPE,
    WASM_LAYER_MEDIA_TYPE,
    artifact_name,
    build_artifact,
    write_layout,
)

# A WASI preview 1 "hello" command: fd_write of a static string to stdout.
HELLO_MODULE_WAT = """
(module
  (type $write (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (type $write)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "env" "table" (table 1 funcref))
  (import "env" "counter" (global (mut i64)))
  (memory (export "memory") 1 4)
  (global (export "answer") i32 (i32.const 42))
  (data (i32.const 8) "hello from wasm\\n")
  (func $main (export "_start")
    (i32.store (i32.const 0) (i32.const 8))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 24))))
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1)))
)
"""

PLAIN_MODULE_WAT = """
(module
  (func (export "double") (param i64) (result i64) (i64.mul (local.get 0) (i64.const 2)))
)
"""

# A component that imports a WASI preview 2 interface and exports a function.
COMPONENT_WAT = """
(component
  (import "wasi:cli/environment@0.2.0" (instance
    (export "get-arguments" (func (result (list string))))))
  (import "log" (func (param "message" string)))
  (core module $m
    (func (export "run") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $run (result u32) (canon lift (core func $i "run")))
  (export "run" (func $run))
)
"""

# Structurally fine, but its code does not type-check: only wasmtime can tell.
ILL_TYPED_WAT = '(module (func (export "f") (result i32)))'


def compile_wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.fixture(scope="module")
def hello_module() -> bytes:
    return compile_wat(HELLO_MODULE_WAT)


@pytest.fixture(scope="module")
def component() -> bytes:
    return compile_wat(COMPONENT_WAT)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zlwasm-") as name:
        yield Path(name)


# ---------------------------------------------------------------- inspect


def test_module_imports_exports_and_wasi_preview1(hello_module: bytes) -> None:
    info = inspect(hello_module)
    assert info.kind == "module" and info.binary_version == 1
    assert info.wasi == "preview1" and info.wasi_interfaces == ["wasi_snapshot_preview1"]
    assert info.os == "wasip1"
    assert [(i.module, i.name, i.kind, i.type) for i in info.imports] == [
        ("wasi_snapshot_preview1", "fd_write", "func", "func(i32, i32, i32, i32) -> i32"),
        ("wasi_snapshot_preview1", "proc_exit", "func", "func(i32)"),
        ("env", "table", "table", "table funcref 1.."),
        ("env", "counter", "global", "global mut i64"),
    ]
    assert [(e.name, e.kind, e.type) for e in info.exports] == [
        ("memory", "memory", ""),
        ("answer", "global", ""),
        ("_start", "func", "func()"),
        ("add", "func", "func(i32, i32) -> i32"),
    ]
    assert info.functions == 2 and info.size == len(hello_module)
    assert info.summary() == "module, 4 imports, 4 exports, WASI preview1"


def test_module_listing_matches_wasmtime(hello_module: bytes) -> None:
    module = wasmtime.Module(wasmtime.Engine(), hello_module)
    info = inspect(hello_module)
    assert [(i.module, i.name) for i in info.imports] == [
        (i.module, i.name) for i in module.imports
    ]
    assert [e.name for e in info.exports] == [e.name for e in module.exports]


def test_module_without_wasi() -> None:
    info = inspect(compile_wat(PLAIN_MODULE_WAT))
    assert info.wasi == "none" and info.imports == []
    assert [(e.name, e.type) for e in info.exports] == [("double", "func(i64) -> i64")]


def test_component_imports_exports_and_wasi_preview2(component: bytes) -> None:
    info = inspect(component)
    assert info.kind == "component" and info.binary_version != 1
    assert info.wasi == "preview2" and info.os == "wasip2"
    assert info.wasi_interfaces == ["wasi:cli/environment@0.2.0"]
    assert [(i.name, i.kind) for i in info.imports] == [
        ("wasi:cli/environment@0.2.0", "instance"),
        ("log", "func"),
    ]
    assert [(e.name, e.kind) for e in info.exports] == [("run", "func")]
    assert info.core_modules == 1
    engine = wasmtime.Engine()
    component_type = wasmtime.component.Component(engine, component).type
    assert [i.name for i in info.imports] == list(component_type.imports(engine))
    assert [e.name for e in info.exports] == list(component_type.exports(engine))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        (b"", "x.wasm is not WebAssembly: the file is empty"),
        (b"#!/bin/sh\necho hi\n", "x.wasm is not WebAssembly: it does not start with the \\0asm"),
        (b"\0as", "x.wasm is truncated WebAssembly: it ends inside the 8-byte header"),
        (b"\0asm\x02\0\0\0", "x.wasm is WebAssembly of an unknown kind (version 2, layer 0)"),
    ],
)
def test_not_wasm_is_one_sentence(data: bytes, sentence: str) -> None:
    with pytest.raises(WasmError) as caught:
        inspect(data, "x.wasm")
    assert str(caught.value).startswith(sentence)
    assert "\n" not in str(caught.value)


def test_truncated_module_names_the_section(hello_module: bytes) -> None:
    with pytest.raises(WasmError, match=r"^x.wasm is truncated WebAssembly: the \w+ section runs"):
        inspect(hello_module[:-3], "x.wasm")
    with pytest.raises(WasmError, match="truncated"):
        validate(hello_module[:20], "x.wasm")


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=0, max_value=400), component_too=st.booleans())
def test_every_truncation_is_a_sentence_or_a_shorter_valid_binary(
    cut: int, component_too: bool
) -> None:
    data = compile_wat(COMPONENT_WAT if component_too else HELLO_MODULE_WAT)
    prefix = data[: min(cut, len(data))]
    try:
        info = inspect(prefix, "x.wasm")
    except WasmError as exc:
        assert str(exc).startswith("x.wasm ") and "\n" not in str(exc)
    else:  # a prefix ending on a section boundary is a shorter binary
        assert info.size == len(prefix)


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=64), layer=st.sampled_from([b"\x01\0\0\0", b"\x0d\0\x01\0"]))
def test_garbage_after_the_header_never_escapes_as_another_error(tail: bytes, layer: bytes) -> None:
    try:
        validate(b"\0asm" + layer + tail, "x.wasm")
    except WasmError as exc:
        assert "\n" not in str(exc)


def test_wasmtime_catches_what_the_structure_hides() -> None:
    data = compile_wat(ILL_TYPED_WAT)
    assert inspect(data).kind == "module"  # structurally a module
    with pytest.raises(WasmError, match=r"^x.wasm is not valid WebAssembly: type mismatch"):
        validate(data, "x.wasm")


def test_component_where_a_module_is_expected(component: bytes, hello_module: bytes) -> None:
    with pytest.raises(WasmError, match=r"^c\.wasm is a component, but a core module is expected"):
        validate(component, "c.wasm", expect="module")
    with pytest.raises(WasmError, match=r"^m\.wasm is a core module, but a component is expected"):
        validate(hello_module, "m.wasm", expect="component")
    assert validate(component, "c.wasm", expect="component").kind == "component"


# ---------------------------------------------------------------- artifacts


def test_artifact_follows_the_cncf_layout(component: bytes) -> None:
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    artifact = build_artifact(component, "/x/hello.wasm", "localhost/hello:1", "ops", created)
    config = json.loads(artifact.config)
    assert config == {
        "created": "2025-01-02T03:04:05Z",
        "author": "ops",
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [artifact.info.digest],
        "component": {"imports": ["wasi:cli/environment@0.2.0", "log"], "exports": ["run"]},
    }
    manifest = json.loads(artifact.manifest)
    assert manifest["config"]["mediaType"] == WASM_CONFIG_MEDIA_TYPE
    assert manifest["config"]["digest"] == artifact.config_digest
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == WASM_LAYER_MEDIA_TYPE
    assert layer["digest"] == artifact.info.digest and layer["size"] == len(component)
    assert layer["annotations"]["org.opencontainers.image.title"] == "hello.wasm"
    assert artifact.name == "localhost/hello:1"


def test_module_artifact_is_wasip1_without_component_info(hello_module: bytes) -> None:
    config = json.loads(build_artifact(hello_module, "m.wasm", "hello").config)
    assert config["os"] == "wasip1" and "component" not in config and "author" not in config


def test_artifact_refuses_bad_binaries_and_names(hello_module: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^m\.wasm is truncated WebAssembly"):
        build_artifact(hello_module[:-4], "m.wasm", "hello")
    with pytest.raises(InvalidArgumentError, match="names a digest"):
        artifact_name("hello@sha256:" + "a" * 64)
    with pytest.raises(InvalidArgumentError):
        artifact_name("Not A Name")


def test_layout_reads_back_as_a_wasm_image(hello_module: bytes, workdir: Path) -> None:
    artifact = build_artifact(hello_module, "m.wasm", "localhost/hello:1")
    layout = workdir / "out"
    write_layout(artifact, layout)
    assert sorted(p.name for p in layout.iterdir()) == ["blobs", "index.json", "oci-layout"]
    assert [p.name for p in workdir.iterdir()] == ["out"]  # no work directory left beside it
    with Source(layout) as source:
        (image,) = source.images()
        with image.config.open() as handle:
            document = json.loads(handle.read())
        assert image.names == ["localhost/hello:1"]
        assert image_runtime(image, document, str(layout)) == ("wasm", [artifact.info.digest])
    with pytest.raises(InvalidArgumentError, match="already exists and is not an empty directory"):
        write_layout(artifact, layout)


def _image(
    layers: list[tuple[bytes, str]], config_type: str, manifest: bytes | None
) -> SourceImage:
    def blob(data: bytes, media_type: str) -> SourceBlob:
        return SourceBlob(
            open=lambda: contextlib.nullcontext(io.BytesIO(data)),
            digest="sha256:" + "0" * 64,
            media_type=media_type,
        )

    return SourceImage(
        names=[],
        config=blob(b"{}", config_type),
        layers=[blob(data, media_type) for data, media_type in layers],
        manifest=manifest,
    )


OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"


def test_recognition_order(hello_module: bytes) -> None:
    digest = ["sha256:" + "0" * 64]
    by_artifact_type = _image(
        [(hello_module, "application/octet-stream")],
        OCI_CONFIG,
        json.dumps({"artifactType": WASM_LAYER_MEDIA_TYPE}).encode(),
    )
    assert image_runtime(by_artifact_type, {}, "p") == ("wasm", digest)
    by_config = _image([(hello_module, "")], WASM_CONFIG_MEDIA_TYPE, None)
    assert image_runtime(by_config, {}, "p") == ("wasm", digest)
    by_layer = _image(
        [(hello_module, "application/vnd.wasm.content.layer.v1+wasm")], OCI_CONFIG, None
    )
    assert image_runtime(by_layer, {}, "p") == ("wasm", digest)
    platform_only = _image([(b"tar bytes", TAR_LAYER)], OCI_CONFIG, None)
    assert image_runtime(platform_only, {"architecture": "wasm", "os": "wasip1"}, "p") == (
        "wasm",
        None,
    )
    container = _image([(b"tar bytes", TAR_LAYER)], OCI_CONFIG, None)
    assert image_runtime(container, {"architecture": "amd64", "os": "linux"}, "p") == ("oci", None)


def test_a_layer_claiming_wasm_must_be_wasm() -> None:
    liar = _image([(b"\x1f\x8b gzip, not wasm", WASM_LAYER_MEDIA_TYPE)], OCI_CONFIG, None)
    with pytest.raises(InvalidArgumentError, match=r"layer 1 of the WASM artifact in p"):
        image_runtime(liar, {}, "p")
