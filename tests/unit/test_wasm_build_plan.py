"""Planning ``zlayerctl wasm build``: defaults from the directory and its `wasm:` ZImagefile,
and every refusal as one sentence (no toolchain is run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.buildfile.wasm import WasmBuildError, find_c_toolchain, plan, wit_worlds

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wasm-http"


def refusal(*args: str | None, **kwargs: str | None) -> str:
    with pytest.raises(WasmBuildError) as caught:
        plan(*args, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_example_plans_with_its_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = plan(str(EXAMPLE))
    assert (job.language, job.target, job.world, job.module) == (
        "python",
        "preview2",
        "proxy",
        "app",
    )
    assert job.wit == EXAMPLE / "wit"
    assert job.output == tmp_path / "wasm-http.wasm"
    # `imports` is included by `proxy`, so it is not a world to build.
    assert wit_worlds(EXAMPLE / "wit") == ["proxy"]


def test_a_wasm_zimagefile_gives_the_settings(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("")
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "w.wit").write_text("package a:b;\nworld one {\n}\nworld two {\n}\n")
    (tmp_path / "ZImagefile").write_text(
        "wasm:\n  language: python\n  wit: api\n  output: out/handler.wasm\n"
    )
    job = plan(str(tmp_path), world="two")
    assert (job.module, job.world, job.wit) == ("handler", "two", tmp_path / "api")
    assert job.output == tmp_path / "out" / "handler.wasm"
    assert (
        refusal(str(tmp_path))
        == f"{tmp_path / 'api'} declares worlds one, two; choose one with --world"
    )


def test_refusals_are_one_sentence(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert refusal(missing) == f"{missing} does not exist; give the directory with the sources"
    (tmp_path / "file").write_text("")
    assert "is not a directory" in refusal(str(tmp_path / "file"))
    assert refusal(str(EXAMPLE), language="rust") == (
        "zlayerctl wasm build cannot build rust; the languages it knows are python and c"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        refusal(str(empty))
        == f"cannot tell the language of {empty}; say it with --language python or c"
    )
    assert refusal(str(empty), language="python").endswith(
        "is not a directory of WIT files; give one with --wit or `wit:`"
    )
    (empty / "wit").mkdir()
    assert (
        refusal(str(empty), language="python", world="w")
        == f"{empty} has no Python module to build; add app.py"
    )


def test_zimagefile_refusals(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("")
    (tmp_path / "ZImagefile").write_text("wasm:\n  target: preview1\n")
    assert refusal(str(tmp_path)) == (
        "componentize-py builds WASI preview2 components only, not preview1; set `target: preview2`"
    )
    (tmp_path / "ZImagefile").write_text("wasm:\n  optimize: true\n")
    assert plan(str(tmp_path), world="w", wit=str(EXAMPLE / "wit")).notes == (
        "`optimize` has no effect on a componentize-py build; the component is as built",
    )
    assert refusal(str(tmp_path), world="app", wit=str(EXAMPLE / "wit")) == (
        "the module app has the name of the bindings componentize-py generates; rename it"
    )
    (tmp_path / "ZImagefile").write_text("runtime: python312\n")
    assert "not a `wasm:` one; build it with `zlayerctl build`" in refusal(str(tmp_path))
    (tmp_path / "ZImagefile").write_text("wasm: {target: preview9}\n")
    assert "ZImagefile:1" in refusal(str(tmp_path))


def test_a_zimagefile_elsewhere_with_z(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("")
    other = tmp_path / "build.yml"
    other.write_text(f"wasm:\n  wit: {EXAMPLE / 'wit'}\n  output: out.wasm\n")
    job = plan(str(tmp_path), zimagefile=str(other))
    assert (job.wit, job.world, job.output) == (EXAMPLE / "wit", "proxy", tmp_path / "out.wasm")
    missing = str(tmp_path / "nope.yml")
    assert refusal(str(tmp_path), zimagefile=missing) == (
        f"{missing} is not a file; give the ZImagefile's path with -z"
    )


# ---------------------------------------------------------------- C


C_EXAMPLE = EXAMPLE.parent / "wasm-c"


def test_c_sources_plan_a_preview1_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = plan(str(C_EXAMPLE))
    assert (job.language, job.target, job.sources, job.optimize) == (
        "c",
        "preview1",
        ("hello.c",),
        False,
    )
    assert job.output == tmp_path / "wasm-c.wasm"
    # Detected from the files, with no ZImagefile; every .c file is compiled together.
    source = tmp_path / "src"
    source.mkdir()
    (source / "main.c").write_text("int main(void) { return 0; }\n")
    (source / "util.c").write_text("")
    (source / "README").write_text("")
    assert plan(str(source)).sources == ("main.c", "util.c")
    (source / "ZImagefile").write_text("wasm:\n  optimize: true\n  wit: wit\n")
    job = plan(str(source))
    assert job.optimize and job.target == "preview1"
    assert job.notes == ("`wit` has no effect on a C build; the module is a WASI preview1 command",)


def test_c_refusals_are_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text("")
    (tmp_path / "ZImagefile").write_text("wasm:\n  target: preview2\n")
    assert refusal(str(tmp_path)) == (
        "clang with wasi-libc builds WASI preview1 modules only, not preview2; "
        "set `target: preview1`"
    )
    (tmp_path / "ZImagefile").unlink()
    assert refusal(str(tmp_path), world="proxy") == (
        "--world, --wit and --module are for Python builds; a C build takes none of them"
    )
    (tmp_path / "app.py").write_text("")
    assert refusal(str(tmp_path)) == (
        f"{tmp_path} has both Python and C sources; say which to build with --language"
    )
    assert plan(str(tmp_path), language="C").language == "c"
    (tmp_path / "main.c").unlink()
    assert refusal(str(tmp_path), language="c") == (
        f"{tmp_path} has no C source to build; add a .c file with main()"
    )


def test_a_missing_c_toolchain_names_the_debian_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sysroot with nothing in it and a PATH without clang: a machine where none of
    the packages was installed."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WasmBuildError) as caught:
        find_c_toolchain(tmp_path)
    assert str(caught.value) == (
        "building C into WebAssembly needs clang, wasm-ld, wasi-libc and the wasm32 compiler "
        "runtime, which this machine lacks; install them with "
        "`apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`"
    )
