"""``zlayerctl wasm build`` with the real toolchain: the wasi:http example's Python source
becomes a component that ``zlayerctl wasm info`` reports as a wasi:http handler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.buildfile.wasm import find_componentize_py
from tests.integration.test_wasm_artifacts import one_sentence, zlayerctl

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm-http"

pytestmark = pytest.mark.timeout(300)


def test_the_wasi_http_example_builds_into_a_component(tmp_path: Path) -> None:
    if find_componentize_py() is None:
        pytest.skip("componentize-py is not installed (pip install componentize-py)")
    built = zlayerctl("wasm", "build", str(EXAMPLE), "-o", "http.wasm", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "wasi:http/incoming-handler" in built.stdout
    info = zlayerctl("wasm", "info", str(tmp_path / "http.wasm"), "--format", "json")
    assert info.returncode == 0, info.stderr
    found = json.loads(info.stdout)
    assert found["kind"] == "component" and found["wasi"] == "preview2"
    assert any(e["name"].startswith("wasi:http/incoming-handler@") for e in found["exports"])


def test_a_bad_build_is_one_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert one_sentence(zlayerctl("wasm", "build", str(missing))) == (
        f"{missing} does not exist; give the directory with the sources"
    )
    assert one_sentence(zlayerctl("wasm", "build", str(EXAMPLE), "--language", "cobol")) == (
        "zlayerctl wasm build cannot build cobol; the languages it knows are python"
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
