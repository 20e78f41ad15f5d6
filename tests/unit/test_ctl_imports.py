"""zlayerctl imports nothing from ``daemons/``; what both need lives in ``shared/``.

zlayerctl is the user's tool: it runs as the user, on hosts where the
daemons may not even be installed the same way, and a daemon's module
drags in what only the daemon needs. So ``ctl/`` may import ``ctl`` and
``shared`` (and libraries), never ``daemons``, and ``shared`` never imports
``daemons`` or ``ctl``. The source is read for every import statement,
those inside functions too, and every module is imported in a fresh
interpreter to see what actually loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ctl.main import LAZY_COMMANDS
from tests.fresh_interpreter import import_all, modules_after

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"ctl": ("daemons",), "shared": ("daemons", "ctl")}
IMPORTERS = ("import_module", "__import__")


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module the file imports, wherever the statement stands (a function, a branch)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0] if node.args else None
            if (
                name in IMPORTERS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append((node.lineno, first.value))
    return found


def _is_under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_source_imports_a_forbidden_package(package: str) -> None:
    offending = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sorted((REPO / package).rglob("*.py"))
        for line, module in _imported_names(path)
        if _is_under(module, FORBIDDEN[package])
    ]
    assert offending == [], f"{package}/ must not import {' or '.join(FORBIDDEN[package])}"


def test_the_source_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "def f():\n"
        "    from daemons.registryd import auth\n"
        "    import daemons.schedd.main\n"
        "    return importlib.import_module('daemons.agentd')\n"
    )
    modules = [module for _, module in _imported_names(sample)]
    assert [m for m in modules if _is_under(m, ("daemons",))] == [
        "daemons.registryd",
        "daemons.schedd.main",
        "daemons.agentd",
    ]


def test_every_command_is_a_ctl_module() -> None:
    targets = [target.split(":", 1)[0] for target, _ in LAZY_COMMANDS.values()]
    assert [t for t in targets if not _is_under(t, ("ctl",))] == []


def test_importing_all_of_ctl_loads_nothing_from_daemons() -> None:
    """Every ctl module and every command, imported in a fresh interpreter."""
    modules = _modules("ctl")
    loaded = modules_after(
        import_all(*modules) + "import click\n"
        "from ctl.main import cli\n"
        "ctx = click.Context(cli)\n"
        "for name in cli.list_commands(ctx):\n"
        "    assert cli.get_command(ctx, name) is not None, name\n",
        timeout=120,
    )
    assert set(modules) <= loaded
    assert sorted(m for m in loaded if _is_under(m, ("daemons",))) == []
