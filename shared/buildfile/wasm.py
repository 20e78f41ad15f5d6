"""Building WebAssembly from source: the ``wasm`` mode of a ZImagefile and ``zlayerctl wasm build``.

Two toolchains. Python through componentize-py, which makes a WASI preview 2
component for a WIT world (``componentize-py -d WIT -w WORLD componentize
MODULE -p DIR -o OUT``). C through clang with Debian's wasi-libc, which makes
a WASI preview 1 command module of the directory's ``.c`` files (``clang
--target=wasm32-wasi --sysroot=/usr -O2``; Debian lays the sysroot out as a
multiarch triple under ``/usr``). Settings come from the command line first,
then from a ``wasm:`` ZImagefile in the directory, then from the directory
itself (its sources; for Python ``app.py`` or its only ``.py`` file, ``wit/``,
the one WIT world no other world includes). The ZImagefile's ``wit`` and
``output`` are relative to the directory (the build context), wherever the
file is, as a Dockerfile's paths are with ``-f``. Every failure is a
:class:`WasmBuildError` whose text is one sentence.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.buildfile.located import BuildFileError
from shared.buildfile.zimagefile import WasmFile, WasmSettings, load_zimagefile

LANGUAGES = ("python", "c")
BUILD_TIMEOUT_SEC = 15 * 60.0
_WORLD = re.compile(r"^\s*world\s+(%?[A-Za-z][\w-]*)\s*\{", re.MULTILINE)
_INCLUDE = re.compile(r"^\s*include\s+(%?[A-Za-z][\w-]*)\s*;", re.MULTILINE)

# C: Debian's packages and where they put their parts.
C_PACKAGES = "clang lld wasi-libc libclang-rt-dev-wasm32"
C_TARGET = "wasm32-wasi"
C_SYSROOT = Path("/usr")
C_OPTIMIZE = ("-O2",)
# `optimize: true`: the compiler's best, and no names or debug sections in the module.
C_OPTIMIZE_MORE = ("-O3", "-Wl,--strip-all")


class WasmBuildError(ValueError):
    """A build that cannot run or failed; the text is one sentence."""


@dataclass(frozen=True)
class WasmBuild:
    """What to build, every default resolved.

    ``wit``, ``world`` and ``module`` are a Python build's; ``sources`` and
    ``optimize`` a C build's.
    """

    directory: Path
    language: str
    target: str
    output: Path
    wit: Path | None = None
    world: str = ""
    module: str = ""
    sources: tuple[str, ...] = ()
    optimize: bool = False
    notes: tuple[str, ...] = ()


def find_componentize_py() -> str | None:
    """componentize-py beside this interpreter (a virtualenv) or on PATH."""
    beside = Path(sys.executable).parent / "componentize-py"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("componentize-py")


@dataclass(frozen=True)
class CToolchain:
    clang: str
    sysroot: Path


def find_c_toolchain(sysroot: Path = C_SYSROOT) -> CToolchain:
    """clang, wasm-ld, wasi-libc and the wasm32 compiler runtime, or the one sentence
    naming the Debian packages to install."""
    clang = shutil.which("clang")
    missing = []
    if clang is None:
        missing.append("clang")
    if shutil.which("wasm-ld") is None:
        missing.append("wasm-ld")
    if not (sysroot / "lib" / C_TARGET / "libc.a").is_file():
        missing.append("wasi-libc")
    builtins = "lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a"
    if not glob.glob(str(sysroot / builtins)):
        missing.append("the wasm32 compiler runtime")
    if clang is None or missing:
        raise WasmBuildError(
            f"building C into WebAssembly needs {_and(missing)}, which this machine lacks; "
            f"install them with `apt-get install {C_PACKAGES}`"
        )
    return CToolchain(clang, sysroot)


def _and(items: list[str]) -> str:
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def _zimagefile_settings(directory: Path, given: str | None) -> WasmSettings | None:
    path = Path(given) if given else directory / "ZImagefile"
    if given and not path.is_file():
        raise WasmBuildError(f"{given} is not a file; give the ZImagefile's path with -z")
    if not path.is_file():
        return None
    try:
        loaded = load_zimagefile(path)
    except BuildFileError as exc:
        raise WasmBuildError(str(exc)) from None
    if not isinstance(loaded.model, WasmFile):
        raise WasmBuildError(
            f"{path} is a {loaded.mode} ZImagefile, not a `wasm:` one; "
            "build it with `zlayerctl build`"
        )
    return loaded.model.wasm


def wit_worlds(wit: Path) -> list[str]:
    """The worlds a WIT directory offers to build: declared at its top, included by none."""
    declared: list[str] = []
    included: set[str] = set()
    for file in sorted(wit.glob("*.wit")):
        text = file.read_text(encoding="utf-8", errors="replace")
        declared += [name.lstrip("%") for name in _WORLD.findall(text)]
        included |= {name.lstrip("%") for name in _INCLUDE.findall(text)}
    return [name for name in declared if name not in included]


def _python_module(directory: Path) -> str:
    if (directory / "app.py").is_file():
        return "app"
    sources = sorted(p.stem for p in directory.glob("*.py"))
    if len(sources) == 1:
        return sources[0]
    if not sources:
        raise WasmBuildError(f"{directory} has no Python module to build; add app.py")
    raise WasmBuildError(
        f"{directory} has several Python modules ({', '.join(sources)}); choose one with --module"
    )


def _language(root: Path, directory: str, given: str | None, settings: WasmSettings) -> str:
    chosen = given or settings.language
    if chosen is None:
        found = [
            name for name, pattern in (("python", "*.py"), ("c", "*.c")) if any(root.glob(pattern))
        ]
        if len(found) > 1:
            raise WasmBuildError(
                f"{directory} has both Python and C sources; say which to build with --language"
            )
        if not found:
            raise WasmBuildError(
                f"cannot tell the language of {directory}; say it with --language python or c"
            )
        chosen = found[0]
    chosen = chosen.lower()
    if chosen not in LANGUAGES:
        raise WasmBuildError(
            f"zlayerctl wasm build cannot build {chosen}; the languages it knows are "
            f"{' and '.join(LANGUAGES)}"
        )
    return chosen


def plan(
    directory: str,
    language: str | None = None,
    world: str | None = None,
    wit: str | None = None,
    module: str | None = None,
    output: str | None = None,
    zimagefile: str | None = None,
) -> WasmBuild:
    """Resolve a build from options, the directory's ZImagefile and its files."""
    root = Path(directory).resolve()
    if not root.exists():
        raise WasmBuildError(f"{directory} does not exist; give the directory with the sources")
    if not root.is_dir():
        raise WasmBuildError(f"{directory} is not a directory; give the directory with the sources")
    settings = _zimagefile_settings(root, zimagefile) or WasmSettings()
    chosen = _language(root, directory, language, settings)
    if output:
        target = Path(output).resolve()
    elif settings.output:
        target = root / settings.output
    else:
        target = Path.cwd() / f"{root.name or 'app'}.wasm"
    if chosen == "c":
        return _plan_c(root, settings, target, world, wit, module)
    if settings.target != "preview2":
        raise WasmBuildError(
            f"componentize-py builds WASI preview2 components only, not {settings.target}; "
            "set `target: preview2`"
        )
    wit_dir = Path(wit).resolve() if wit else root / (settings.wit or "wit")
    if not wit_dir.is_dir():
        raise WasmBuildError(
            f"{wit_dir} is not a directory of WIT files; give one with --wit or `wit:`"
        )
    if world is None:
        worlds = wit_worlds(wit_dir)
        if len(worlds) != 1:
            found = f"declares worlds {', '.join(worlds)}" if worlds else "declares no world"
            raise WasmBuildError(f"{wit_dir} {found}; choose one with --world")
        world = worlds[0]
    chosen_module = module or _python_module(root)
    if chosen_module in (world, "wit_world"):
        # componentize-py generates a package of that name: the module would hide it.
        raise WasmBuildError(
            f"the module {chosen_module} has the name of the bindings componentize-py generates; "
            "rename it"
        )
    notes: tuple[str, ...] = ()
    if settings.optimize:
        notes = ("`optimize` has no effect on a componentize-py build; the component is as built",)
    return WasmBuild(
        root,
        chosen,
        settings.target,
        target,
        wit=wit_dir,
        world=world,
        module=chosen_module,
        notes=notes,
    )


def _plan_c(
    root: Path,
    settings: WasmSettings,
    target: Path,
    world: str | None,
    wit: str | None,
    module: str | None,
) -> WasmBuild:
    if world is not None or wit is not None or module is not None:
        raise WasmBuildError(
            "--world, --wit and --module are for Python builds; a C build takes none of them"
        )
    # The model's default target is preview2 (a component); only a written one is refused.
    if "target" in settings.model_fields_set and settings.target != "preview1":
        raise WasmBuildError(
            f"clang with wasi-libc builds WASI preview1 modules only, not {settings.target}; "
            "set `target: preview1`"
        )
    sources = tuple(sorted(p.name for p in root.glob("*.c") if p.is_file()))
    if not sources:
        raise WasmBuildError(f"{root} has no C source to build; add a .c file with main()")
    notes: tuple[str, ...] = ()
    if settings.wit:
        notes = ("`wit` has no effect on a C build; the module is a WASI preview1 command",)
    return WasmBuild(
        root,
        "c",
        "preview1",
        target,
        sources=sources,
        optimize=settings.optimize,
        notes=notes,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else "it gave no reason"


def _first_error(text: str) -> str:
    """clang's first error (its last line only counts them)."""
    for line in text.splitlines():
        if "error:" in line:
            return line.strip().rstrip(".")
    return _last_line(text)


def _run(command: list[str], cwd: Path, tool: str) -> subprocess.CompletedProcess[str]:
    try:
        # Its working directory is the sources', so relative includes and imports resolve
        # there and errors name the files as the user wrote them.
        return subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SEC,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WasmBuildError(f"{tool} did not finish in {BUILD_TIMEOUT_SEC:.0f} seconds") from None
    except OSError as exc:
        raise WasmBuildError(f"cannot run {command[0]}: {exc.strerror or exc}") from None


def build(job: WasmBuild) -> Path:
    """Run the toolchain; the built file's path."""
    if job.language == "c":
        return _build_c(job)
    tool = find_componentize_py()
    if tool is None:
        raise WasmBuildError(
            "componentize-py is not installed; install it with `pip install componentize-py`"
        )
    job.output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        tool, "-d", str(job.wit), "-w", job.world, "componentize", job.module,
        "-p", str(job.directory), "-o", str(job.output),
    ]  # fmt: skip
    done = _run(command, job.directory, "componentize-py")
    if done.returncode != 0 or not job.output.is_file():
        reason = _last_line(done.stderr or done.stdout)
        raise WasmBuildError(f"componentize-py could not build {job.module}: {reason}")
    return job.output


def _build_c(job: WasmBuild) -> Path:
    toolchain = find_c_toolchain()
    job.output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and moved into place: a failed build leaves no file.
    partial = job.output.with_name(f".{job.output.name}.{os.getpid()}.partial")
    command = [
        toolchain.clang, f"--target={C_TARGET}", f"--sysroot={toolchain.sysroot}",
        *(C_OPTIMIZE_MORE if job.optimize else C_OPTIMIZE), "-I.",
        *job.sources, "-o", str(partial),
    ]  # fmt: skip
    try:
        done = _run(command, job.directory, "clang")
        if done.returncode != 0 or not partial.is_file():
            reason = _first_error(done.stderr or done.stdout)
            raise WasmBuildError(f"clang could not build {job.directory.name}: {reason}")
        os.replace(partial, job.output)
    finally:
        partial.unlink(missing_ok=True)
    return job.output
