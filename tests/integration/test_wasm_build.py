"""``zlayerctl wasm build`` with the real toolchain: the wasi:http example's Python source
becomes a component that ``zlayerctl wasm info`` reports as a wasi:http handler, and
``--export NAME --import`` puts it in a real registryd as a wasm image."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from shared.buildfile.wasm import find_componentize_py
from tests.integration.test_registryd import Registryd
from tests.integration.test_wasm_artifacts import one_sentence, registryd, zlayerctl

__all__ = ["registryd"]  # the fixture, shared with the artifact tests

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm-http"

pytestmark = pytest.mark.timeout(300)


def test_the_wasi_http_example_builds_into_a_component_and_imports(
    registryd: Registryd, tmp_path: Path
) -> None:
    if find_componentize_py() is None:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    module = tmp_path / "http.wasm"
    reference = "localhost/wasm-http-built:1"
    built = registryd.ok(
        "wasm", "build", str(EXAMPLE), "-o", str(module), "--export", reference, "--import"
    )
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
        "zlayerctl wasm build cannot build cobol; the languages it knows are python"
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
