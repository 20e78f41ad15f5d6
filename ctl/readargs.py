"""The read commands' arguments, parsed without click.

``zlayerctl ps``, ``status``, ``routes``, ``dns``, ``image ls`` and ``events``
are run many times a day and must start quickly; importing click costs more
than the rest of such a command. :func:`parse` reads their command lines
when every word is one this table knows, with the value click would give it;
anything else (``--help``, a usage error, ``--follow``, an attached value
such as ``-dweb``, shell completion) returns None and click runs the command
as always, with its own messages. ``tests/unit/test_ctl_reads.py`` holds the
table to the click commands' options. ``up -b [FILE]`` (``ctl.up_background``) is read
here too, when it goes to this node's bus: ``tests/unit/test_ctl_up_fast.py``; so is
``pull IMAGE`` (``ctl.registry_jobs``): ``tests/unit/test_ctl_pull_fast.py``; so is
``validate FILE`` (``ctl.spec_check``): ``tests/unit/test_ctl_validate_fast.py``.

Importing this module imports nothing but ``os``, ``sys`` and ``typing`` (which click and
the read path load anyway): not dataclasses, whose ``inspect`` the read path does not need.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

FLAG = "flag"
TEXT = "text"
FORMAT = "format"
LINES = "lines"
FLOAT = "float"
POLICY = "policy"
FORMATS = ("table", "json")
POLICIES = ("always", "newer", "if_not_present", "never")  # pull --policy
LINES_RANGE = (1, 2000)  # events -n: click.IntRange(1, 2000)


class ReadCommand:
    """One read command: its words, options and defaults, and where its body lives."""

    __slots__ = ("defaults", "options", "preload_wire", "remote_target", "target", "words")

    def __init__(
        self,
        words: tuple[str, ...],
        target: str,
        options: dict[str, tuple[str, str]],
        defaults: dict[str, Any],
        remote_target: str = "",
        preload_wire: bool = True,
    ) -> None:
        self.words = words
        self.target = target  # "module:function", called with the parsed options as keywords
        self.options = options  # option -> (parameter, kind)
        self.defaults = defaults
        # the body when the command goes to a node's API, if not ``target`` itself
        self.remote_target = remote_target
        # msgspec imported before the body's module, as it wants it; False for a body that
        # imports it itself, later (pull: once its job is started)
        self.preload_wire = preload_wire


_FORMAT_OPTION = {"--format": ("output_format", FORMAT)}
_DEPLOYMENT_OPTION = {"-d": ("deployment", TEXT), "--deployment": ("deployment", TEXT)}

READ_COMMANDS: tuple[ReadCommand, ...] = (
    ReadCommand(
        ("ps",),
        "ctl.reads:ps",
        {"--containers": ("containers", FLAG), **_DEPLOYMENT_OPTION, **_FORMAT_OPTION},
        {"containers": False, "deployment": None, "output_format": "table"},
    ),
    ReadCommand(
        ("status",),
        "ctl.status_cmd:show",
        dict(_FORMAT_OPTION),
        {"output_format": "table"},
        remote_target="ctl.reads:remote_status",
    ),
    ReadCommand(
        ("routes",),
        "ctl.reads:routes",
        {**_DEPLOYMENT_OPTION, **_FORMAT_OPTION},
        {"deployment": None, "output_format": "table"},
    ),
    ReadCommand(
        ("dns",),
        "ctl.reads:dns",
        {**_DEPLOYMENT_OPTION, **_FORMAT_OPTION},
        {"deployment": None, "output_format": "table"},
    ),
    ReadCommand(
        ("image", "ls"),
        "ctl.reads:image_ls",
        {**_FORMAT_OPTION, "-q": ("quiet", FLAG), "--quiet": ("quiet", FLAG)},
        {"output_format": "table", "quiet": False},
    ),
    ReadCommand(
        ("events",),
        "ctl.reads:events",
        {
            **_DEPLOYMENT_OPTION,
            "-n": ("limit", LINES),
            "--lines": ("limit", LINES),
            **_FORMAT_OPTION,
        },
        {"deployment": None, "limit": 50, "output_format": "table"},
    ),
)


def _value(kind: str, text: str) -> Any:
    """The value click gives ``text`` for an option of ``kind``, or None to leave it to click."""
    if text.startswith("-"):
        return None  # click would take it as the value; rare enough to leave to click
    if kind == FORMAT:
        return text if text in FORMATS else None
    if kind == POLICY:
        return text if text in POLICIES else None
    if kind == LINES:
        if not (text.isascii() and text.isdigit()):
            return None
        number = int(text)
        low, high = LINES_RANGE
        return number if low <= number <= high else None
    if kind == FLOAT:
        try:
            return float(text)  # as click.FLOAT converts it
        except ValueError:
            return None
    return text


# ``up -b [FILE]``: one Deploy through the blocking bus reader. Its other options
# (-d, --timeout) change nothing once -b is given; they are read so that click
# would take the same command line without an error.
UP_BACKGROUND = ReadCommand(
    ("up",),
    "ctl.up_background:up_background",
    {"-b": ("background", FLAG), "-d": ("detach", FLAG), "--timeout": ("timeout", FLOAT)},
    {"file": None},
)


def _read_words(
    command: ReadCommand, argv: list[str], positional: str
) -> tuple[dict[str, Any], set[str]] | None:
    """``argv``'s values after ``command.words`` over its defaults, and the parameters given;
    or None to leave ``argv`` to click: a word it does not know, a value click would read
    otherwise, an empty or a second ``positional``. A value whose parameter has no default
    is checked but not kept: the command does not take it."""
    values = dict(command.defaults)
    given: set[str] = set()
    rest = argv[len(command.words) :]
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if not word.startswith("-"):
            if not word or values[positional] is not None:
                return None  # an empty one or an extra argument: click's messages
            values[positional] = word
            continue
        option, equals, attached = word.partition("=") if word.startswith("--") else (word, "", "")
        spec = command.options.get(option)
        if spec is None:
            return None
        parameter, kind = spec
        given.add(parameter)
        if kind == FLAG:
            if equals:
                return None
            continue
        if equals:
            text = attached
        elif index < len(rest):
            text = rest[index]
            index += 1
        else:
            return None
        value = _value(kind, text)
        if value is None:
            return None
        if parameter in values:
            values[parameter] = value
    return values, given


def parse_up_background(argv: list[str]) -> tuple[ReadCommand, dict[str, Any]] | None:
    """``up -b [FILE]`` on this node's bus and its FILE, or None to leave ``argv`` to click:
    no -b, a word click would read otherwise (``-bd``, ``--``, ``-``, a second FILE), or a
    command that may go to a node's API (``ctl.deploy_cmd.up`` sends it there)."""
    read = _read_words(UP_BACKGROUND, argv, "file")
    if read is None:
        return None
    values, given = read
    if "background" not in given or _goes_to_an_api():
        return None
    return UP_BACKGROUND, values


# ``pull IMAGE [--policy P] [--format F]``: ``ctl.registry_jobs.pull`` is the whole command
# after its arguments, on this node's bus or through a node's API alike (it asks which).
PULL = ReadCommand(
    ("pull",),
    "ctl.registry_jobs:pull",
    {"--policy": ("policy", POLICY), **_FORMAT_OPTION},
    {"image_name": None, "policy": "always", "output_format": "table"},
    preload_wire=False,
)


def parse_pull(argv: list[str]) -> tuple[ReadCommand, dict[str, Any]] | None:
    """``pull IMAGE``'s options, or None to leave ``argv`` to click: no IMAGE or a second
    one, an empty one, ``--``, ``-h``/``--help`` or any other word it does not know."""
    read = _read_words(PULL, argv, "image_name")
    if read is None or read[0]["image_name"] is None:
        return None
    return PULL, read[0]


# ``validate FILE [--format F]``: ``ctl.spec_check.validate`` is the click command's whole body.
# It reads the file on this machine wherever other commands go (a node's API has no part in
# it), so --host and contexts change nothing. Without FILE (the one spec file here) it goes
# to click, as the rarer form.
VALIDATE = ReadCommand(
    ("validate",),
    "ctl.spec_check:validate",
    dict(_FORMAT_OPTION),
    {"file": None, "output_format": "table"},
)


def parse_validate(argv: list[str]) -> tuple[ReadCommand, dict[str, Any]] | None:
    """``validate FILE``'s options, or None to leave ``argv`` to click: no FILE or a second
    one, an empty one, ``--``, ``-h``/``--help`` or any other word it does not know."""
    read = _read_words(VALIDATE, argv, "file")
    if read is None or read[0]["file"] is None:
        return None
    return VALIDATE, read[0]


def _goes_to_an_api() -> bool:
    """Whether the command may go to a node's API; a context that cannot be read is left to
    click too, which reads the file first, as before."""
    try:
        return is_remote()
    except Exception:
        return True


# ---------------------------------------------------------------- where commands go
# (ctl.contexts decides; these are here so that the local path imports nothing more)

HOST_ENV = "ZLAYER_HOST"
TOKEN_ENV = "ZLAYER_TOKEN"
HOST_OPTION = "--host"
CONTEXTS_FILE = "contexts.toml"

_host_option: list[str] = []  # what a leading --host said


def set_host_option(host: str | None) -> None:
    _host_option.clear()
    if host is not None:
        _host_option.append(host)


def host_option() -> str | None:
    return _host_option[0] if _host_option else None


def take_host_option(argv: list[str]) -> list[str]:
    """``argv`` without a leading ``--host URL`` / ``--host=URL``, which is remembered.

    Only before the command, as a global option is given: ``zlayerctl --host URL ps``.
    A ``--host`` without its value is left to click, which says what is missing.
    """
    if argv and argv[0].startswith(HOST_OPTION + "="):
        set_host_option(argv[0][len(HOST_OPTION) + 1 :])
        return argv[1:]
    if len(argv) >= 2 and argv[0] == HOST_OPTION:
        set_host_option(argv[1])
        return argv[2:]
    return argv


def config_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "zlayer")


def contexts_path() -> str:
    return os.path.join(config_dir(), CONTEXTS_FILE)


def may_be_remote() -> bool:
    """Whether a command may go to a node's API: --host, ZLAYER_HOST or a contexts file.
    False is final (the local bus); True asks ``ctl.contexts.target``."""
    return bool(_host_option) or HOST_ENV in os.environ or os.path.exists(contexts_path())


def is_remote() -> bool:
    """Whether commands go to a node's API."""
    if not may_be_remote():
        return False
    from ctl.contexts import target

    return target() is not None


def parse(argv: list[str]) -> tuple[ReadCommand, dict[str, Any]] | None:
    """The read command ``argv`` runs and its options, or None to leave ``argv`` to click."""
    if any(name.endswith("_COMPLETE") for name in os.environ):
        return None  # click's shell completion
    if argv[:1] == list(UP_BACKGROUND.words):
        return parse_up_background(argv)
    if argv[:1] == list(PULL.words):
        return parse_pull(argv)
    if argv[:1] == list(VALIDATE.words):
        return parse_validate(argv)
    for command in READ_COMMANDS:
        if tuple(argv[: len(command.words)]) == command.words:
            break
    else:
        return None
    values = dict(command.defaults)
    rest = argv[len(command.words) :]
    index = 0
    while index < len(rest):
        word = rest[index]
        option, equals, attached = word.partition("=") if word.startswith("--") else (word, "", "")
        spec = command.options.get(option)
        if spec is None:
            return None
        parameter, kind = spec
        if kind == FLAG:
            if equals:
                return None
            values[parameter] = True
            index += 1
            continue
        if equals:
            text = attached
            index += 1
        elif index + 1 < len(rest):
            text = rest[index + 1]
            index += 2
        else:
            return None
        value = _value(kind, text)
        if value is None:
            return None
        values[parameter] = value
    return command, values


def runner(command: ReadCommand) -> Callable[..., None]:
    """The function that runs ``command``'s body."""
    import importlib

    if command.preload_wire:
        import_msgspec_lean()
    target = command.target
    if command.remote_target and is_remote():
        target = command.remote_target
    module, function = target.split(":", 1)
    found: Callable[..., None] = getattr(importlib.import_module(module), function)
    return found


def import_msgspec_lean() -> None:
    """Import msgspec as it runs where typing_extensions is not installed, and without
    the ``platform`` module.

    msgspec imports typing_extensions when it finds it (pydantic installs
    it), an optional import it does without; typing_extensions imports
    ``inspect`` (ast, dis, tokenize): about 15 ms of a read command's start,
    for nothing the wire Structs use. The module is hidden only while msgspec
    imports; anything imported later finds it as usual.

    msgspec imports ``uuid``, which imports ``platform`` (a dozen regular
    expressions compiled, a named tuple made: about 7% of a read command's
    start) for one value, ``platform.system()``; while msgspec imports, uuid
    finds a stand-in that answers it as platform does on Linux, ``os.uname()``'s
    sysname. The stand-in is gone afterwards: ``import platform`` later loads
    the real one. ``tests/unit/test_ctl_reads.py`` holds uuid's answers to
    what the real module gives.
    """
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    hidden: dict[str, Any] = {"typing_extensions": None}  # None: the import fails
    if "platform" not in sys.modules and "uuid" not in sys.modules and sys.platform == "linux":
        hidden["platform"] = _PlatformStandIn()
    sys.modules.update(hidden)
    try:
        import msgspec  # noqa: F401
    finally:
        for name, module in hidden.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class _PlatformStandIn:
    """What ``uuid`` asks of ``platform`` as it imports (``system()``), on Linux."""

    __name__ = "platform"

    @staticmethod
    def system() -> str:
        return os.uname().sysname

    __spec__ = None  # what the import system asks of a module it finds in sys.modules

    def __getattr__(self, name: str) -> Any:
        """Anything else (a later msgspec asking more of it): the real module's."""
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get("platform") is self:  # type: ignore[comparison-overlap]
            del sys.modules["platform"]
        import platform

        return getattr(platform, name)
