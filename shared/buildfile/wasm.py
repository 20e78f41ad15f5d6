"""Building WebAssembly from source: the ``wasm`` mode of a ZImagefile and ``zlayerctl wasm build``.

One toolchain today: Python through componentize-py, which makes a WASI
preview 2 component for a WIT world (``componentize-py -d WIT -w WORLD
componentize MODULE -p DIR -o OUT``). Settings come from the command line
first, then from a ``wasm:`` ZImagefile in the directory, then from the
directory itself (``app.py`` or its only ``.py`` file, ``wit/``, the one WIT
world no other world includes). The ZImagefile's ``wit`` and ``output`` are
relative to the directory (the build context), wherever the file is, as a
Dockerfile's paths are with ``-f``. Every failure is a :class:`WasmBuildError`
whose text is one sentence.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.buildfile.located import BuildFileError
from shared.buildfile.zimagefile import WasmFile, WasmSettings, load_zimagefile

LANGUAGES = ("python",)
BUILD_TIMEOUT_SEC = 15 * 60.0
_WORLD = re.compile(r"^\s*world\s+(%?[A-Za-z][\w-]*)\s*\{", re.MULTILINE)
_INCLUDE = re.compile(r"^\s*include\s+(%?[A-Za-z][\w-]*)\s*;", re.MULTILINE)


class WasmBuildError(ValueError):
    """A build that cannot run or failed; the text is one sentence."""


@dataclass(frozen=True)
class WasmBuild:
    """What to build, every default resolved."""

    directory: Path
    language: str
    target: str
    wit: Path
    world: str
    module: str
    output: Path
    notes: tuple[str, ...] = ()


def find_componentize_py() -> str | None:
    """componentize-py beside this interpreter (a virtualenv) or on PATH."""
    beside = Path(sys.executable).parent / "componentize-py"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("componentize-py")


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
    chosen = language or settings.language or ("python" if any(root.glob("*.py")) else None)
    if chosen is None:
        raise WasmBuildError(
            f"cannot tell the language of {directory}; say it with --language python"
        )
    chosen = chosen.lower()
    if chosen not in LANGUAGES:
        raise WasmBuildError(
            f"zlayerctl wasm build cannot build {chosen}; the languages it knows are "
            f"{', '.join(LANGUAGES)}"
        )
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
    if output:
        target = Path(output).resolve()
    elif settings.output:
        target = root / settings.output
    else:
        target = Path.cwd() / f"{root.name or 'app'}.wasm"
    return WasmBuild(root, chosen, settings.target, wit_dir, world, chosen_module, target, notes)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else "it gave no reason"


def build(job: WasmBuild) -> Path:
    """Run the toolchain; the built file's path."""
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
    try:
        # Its working directory is the sources', so the module's relative imports resolve there.
        done = subprocess.run(
            command,
            cwd=job.directory,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SEC,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WasmBuildError(
            f"componentize-py did not finish in {BUILD_TIMEOUT_SEC:.0f} seconds"
        ) from None
    except OSError as exc:
        raise WasmBuildError(f"cannot run {tool}: {exc.strerror or exc}") from None
    if done.returncode != 0 or not job.output.is_file():
        reason = _last_line(done.stderr or done.stdout)
        raise WasmBuildError(f"componentize-py could not build {job.module}: {reason}")
    return job.output
