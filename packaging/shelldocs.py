"""Write zlayerctl's shell completions and man pages under a package's root.

    python packaging/shelldocs.py ROOT [--zsh-dir DIR]

Both come from the click command tree, so a command added to
``ctl.main.LAZY_COMMANDS`` gets its page and its completion with no edit here:

- completions are click's own scripts (what ``_ZLAYERCTL_COMPLETE=bash_source
  zlayerctl`` prints), which ask zlayerctl itself for the words at each <TAB>;
- man pages are click-man's (from PyPI), one per command and subcommand as
  podman's are (``zlayerctl-image-ls.1``), gzipped. click-man walks a group's
  loaded commands only, so every lazy command is loaded first.

Runs with the Python ZLayer is installed in, and needs click-man importable
(the package build puts it on PYTHONPATH for this step only).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

import click
from click.shell_completion import get_completion_class
from click_man.core import write_man_pages  # type: ignore[import-untyped]

PROG = "zlayerctl"
COMPLETE_VAR = "_ZLAYERCTL_COMPLETE"
# shell -> where the distribution's shell looks for a vendor's completion of PROG
COMPLETIONS = {
    "bash": "usr/share/bash-completion/completions/zlayerctl",
    "zsh": "usr/share/zsh/vendor-completions/_zlayerctl",
    "fish": "usr/share/fish/vendor_completions.d/zlayerctl.fish",
}
MANDIR = "usr/share/man/man1"


def load_tree(command: click.Command, ctx: click.Context | None = None) -> None:
    """Load every subcommand (``LazyGroup`` imports its commands only on demand) and make
    each help text safe for roff, which click-man copies as it is."""
    ctx = click.Context(command, info_name=command.name, parent=ctx)
    if command.short_help is None and command.help:
        # the page's NAME line: the first sentence, not click-man's 45 characters
        command.short_help = command.get_short_help_str(limit=200)
    command.help = _roff_text(command.help)
    command.short_help = _roff_text(command.short_help)
    for param in command.params:
        if isinstance(param, click.Option):
            param.help = _roff_text(param.help)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                command.commands.setdefault(name, sub)
                load_tree(sub, ctx)


def _roff_text(text: str | None) -> str | None:
    """A backslash is roff's escape, and a line starting with ``.`` or ``'`` a request."""
    if text is None:
        return None
    lines = text.replace("\\", "\\e").split("\n")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def write_completions(root: Path, cli: click.Command, zsh_path: str) -> list[Path]:
    written = []
    for shell, relative in {**COMPLETIONS, "zsh": zsh_path}.items():
        completion = get_completion_class(shell)
        assert completion is not None, shell
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(completion(cli, {}, PROG, COMPLETE_VAR).source())
        written.append(path)
    return written


def write_man(root: Path, cli: click.Command, version: str) -> list[Path]:
    mandir = root / MANDIR
    mandir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        write_man_pages(PROG, cli, version=version, target_dir=scratch)
        for page in sorted(Path(scratch).glob("*.1")):
            target = mandir / (page.name + ".gz")
            # mtime=0: the same tree gives the same bytes
            with gzip.GzipFile(target, "wb", compresslevel=9, mtime=0) as out:
                out.write(page.read_bytes())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--zsh-dir",
        default=str(Path(COMPLETIONS["zsh"]).parent),
        help="the zsh completion directory, relative to ROOT",
    )
    args = parser.parse_args(argv)

    from ctl.cli import cli
    from shared import __version__

    load_tree(cli)
    written = write_completions(args.root, cli, f"{args.zsh_dir.strip('/')}/_{PROG}")
    written += write_man(args.root, cli, __version__)
    print(f"{len(written)} files under {args.root}", file=sys.stderr)


if __name__ == "__main__":
    main()
