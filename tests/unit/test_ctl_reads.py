"""zlayerctl's read commands start without click, asyncio or sdbus, and say what they said.

ps, status, routes, dns, image ls and events read through
``shared.busread`` (jeepney, blocking) and parse their command line with
``ctl.readargs`` instead of click. These tests hold the two tables there to
what they stand in for (the sdbus interfaces, the click commands, sdbus's
error mapping) and run the commands against a real dbus-daemon.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
import sdbus
from sdbus.sd_bus_internals import DBUS_ERROR_TO_EXCEPTION

from ctl import readargs
from ctl.errors import NOT_RUNNING, explain
from ctl.main import cli
from ctl.supervisor_state import state_file
from shared import busread, clients
from shared.bus import BUS_ADDRESS_ENV, DAEMONS, DAEMONS_BY_NAME, ERRORS, resolve_bus_address
from shared.busdaemon import PrivateBus
from shared.busread import READS, BusError, BusReader, NoBusError
from shared.paths import PREFIX_ENV, Paths
from tests.fresh_interpreter import modules_after

REPO = Path(__file__).resolve().parents[2]
SLOW_IMPORTS = {
    "click",
    "asyncio",
    "sdbus",
    "shared.bus",
    "pydantic",
    "rich",
    "typing_extensions",
    # uuid's, as msgspec imports it: ctl.readargs stands in for it (and its answer is checked)
    "platform",
}


# ---------------------------------------------------------------- the tables


def _member(interface: type, name: str) -> typing.Any:
    for value in vars(interface).values():
        if getattr(value, "method_name", None) == name:
            return value
    raise AssertionError(f"{interface.__name__} has no method {name}")


@pytest.mark.parametrize("key", sorted(READS))
def test_each_read_is_the_interface_member_it_names(key: str) -> None:
    read = READS[key]
    infos = [DAEMONS_BY_NAME[read.daemon]] if read.daemon else list(DAEMONS)
    for info in infos:
        member = _member(info.interface, read.member)
        assert member.input_signature == read.signature, info.name
        assert member.result_signature == read.result, info.name


def test_the_job_removed_signal_is_registryds() -> None:
    signal = vars(DAEMONS_BY_NAME[busread.JOB_REMOVED.daemon].interface)["job_removed"]
    assert signal.signal_name == busread.JOB_REMOVED.member
    assert signal.signal_signature == busread.JOB_REMOVED.signature


def test_bus_names_errors_and_paths_are_those_of_shared_bus() -> None:
    assert {d.name: d.bus_name for d in DAEMONS} == busread.BUS_NAMES
    assert list(busread.BUS_NAMES) == [d.name for d in DAEMONS]  # status lists them in order
    assert {busread.object_path(d.bus_name) for d in DAEMONS} == {d.object_path for d in DAEMONS}
    assert {e.dbus_error_name for e in ERRORS} == busread.ZLAYER_ERRORS
    assert busread.BUS_ADDRESS_ENV == BUS_ADDRESS_ENV
    assert busread.PREFIX_ENV == PREFIX_ENV


@pytest.mark.parametrize("prefix", ["", "/", "/tmp/zl-x", "/tmp/zl-y/", "relative/p"])
def test_bus_address_and_state_file_are_found_where_paths_says(tmp_path: Path, prefix: str) -> None:
    env = {PREFIX_ENV: prefix} if prefix else {}
    paths = Paths.from_env(env)
    assert state_file(env) == str(paths.supervisor_state)
    assert busread.bus_address(env) == resolve_bus_address(paths, env)
    # with an address file, and with the variable that overrides it
    there = Paths(tmp_path)
    there.run_dir.mkdir(parents=True)
    there.bus_address_file.write_text("unix:path=/tmp/x.sock,guid=abc\n")
    env = {PREFIX_ENV: str(tmp_path)}
    assert (
        busread.bus_address(env)
        == resolve_bus_address(there, env)
        == ("unix:path=/tmp/x.sock,guid=abc")
    )
    env[BUS_ADDRESS_ENV] = "unix:path=/tmp/y.sock"
    assert busread.bus_address(env) == resolve_bus_address(there, env) == "unix:path=/tmp/y.sock"


def _client_method(name: str) -> typing.Any:
    for client in (
        clients.SchedulerClient,
        clients.AgentClient,
        clients.RegistryClient,
        clients.OverlayClient,
        clients.ProxyClient,
    ):
        if hasattr(client, name):
            return getattr(client, name)
    raise AssertionError(f"no typed client has {name}")


@pytest.mark.parametrize("key", sorted(set(READS) - {"status"}))
def test_each_typed_read_returns_what_the_sdbus_client_returns(key: str) -> None:
    # busread names the wire types for the type checker only (imported when a read runs)
    import shared.wire.agent
    import shared.wire.jobs
    import shared.wire.registry
    import shared.wire.scheduler
    import shared.wire.traffic

    names: dict[str, typing.Any] = {}
    for module in (
        shared.wire.agent,
        shared.wire.jobs,
        shared.wire.registry,
        shared.wire.scheduler,
        shared.wire.traffic,
    ):
        names.update(vars(module))
    ours = typing.get_type_hints(getattr(BusReader, key), localns=names)
    theirs = typing.get_type_hints(_client_method(key))
    assert ours["return"] == theirs["return"]
    assert list(inspect.signature(getattr(BusReader, key)).parameters) == list(
        inspect.signature(_client_method(key)).parameters
    )


def _click_command(words: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    ctx = click.Context(cli)
    for word in words:
        assert isinstance(command, click.Group)
        found = command.get_command(ctx, word)
        assert found is not None
        command = found
    return command


@pytest.mark.parametrize("command", readargs.READ_COMMANDS, ids=lambda c: " ".join(c.words))
def test_each_read_command_knows_the_options_and_defaults_click_has(
    command: readargs.ReadCommand,
) -> None:
    real = _click_command(command.words)
    options = {
        opt: param.name
        for param in real.params
        if isinstance(param, click.Option) and param.name not in ("follow", "help")
        for opt in param.opts
    }
    assert {opt: name for opt, (name, _kind) in command.options.items()} == options
    given = real.make_context(real.name, [], parent=click.Context(cli)).params
    assert command.defaults == {k: v for k, v in given.items() if k != "follow"}


ARGVS = [
    ["ps"],
    ["ps", "--containers"],
    ["ps", "-d", "web", "--format", "json"],
    ["ps", "--deployment=web", "--containers", "--format=table"],
    ["ps", "-d", ""],
    ["ps", "-d", "a", "-d", "b"],
    ["status"],
    ["status", "--format", "json"],
    ["routes", "-d", "web"],
    ["dns", "--format=json", "--deployment", "x"],
    ["image", "ls"],
    ["image", "ls", "-q"],
    ["image", "ls", "--quiet", "--format", "json"],
    ["events"],
    ["events", "-n", "5"],
    ["events", "--lines=2000", "-d", "web"],
    ["events", "-n", "1", "--format", "json"],
]
LEFT_TO_CLICK = [
    ["ps", "--help"],
    ["ps", "-h"],
    ["ps", "extra"],
    ["ps", "--format", "yaml"],
    ["ps", "--format"],
    ["ps", "-dweb"],
    ["ps", "--containers=1"],
    ["ps", "-d", "-x"],
    ["ps", "--", "x"],
    ["status", "--verbose"],
    ["image", "ls", "-qq"],
    ["image", "inspect", "x"],
    ["events", "-f"],
    ["events", "--follow"],
    ["events", "-n", "0"],
    ["events", "-n", "2001"],
    ["events", "-n", "five"],
    ["events", "-n", "+5"],
    ["--version"],
    ["up"],
    [],
]


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_a_read_command_line_parses_as_click_parses_it(argv: list[str]) -> None:
    parsed = readargs.parse(argv)
    assert parsed is not None
    command, values = parsed
    real = _click_command(command.words)
    ctx = real.make_context(real.name, argv[len(command.words) :], parent=click.Context(cli))
    # events: the body is `events` without --follow (which click runs itself)
    assert values == {k: v for k, v in ctx.params.items() if k != "follow"}
    assert ctx.params.get("follow", False) is False


@pytest.mark.parametrize("argv", LEFT_TO_CLICK, ids=" ".join)
def test_anything_else_is_left_to_click(argv: list[str]) -> None:
    assert readargs.parse(argv) is None


def test_shell_completion_is_left_to_click(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_ZLAYERCTL_COMPLETE", "bash_complete")
    assert readargs.parse(["ps"]) is None


# ---------------------------------------------------------------- errors


MESSAGES = ["The name org.zlayer.Proxy1 was not provided by any .service files", "boom", ""]


@pytest.mark.parametrize("name", sorted(DBUS_ERROR_TO_EXCEPTION))
def test_an_error_reply_reads_as_the_sdbus_exception_for_it_does(name: str) -> None:
    for message in MESSAGES:
        try:
            raised: BaseException = DBUS_ERROR_TO_EXCEPTION[name](message)
        except Exception:  # a class sdbus cannot make from a message alone
            continue
        assert explain(BusError(name, message)) == explain(raised), (name, message)


def test_an_unknown_error_name_reads_as_sdbus_unmapped_error_does() -> None:
    name = "org.example.Error.Odd"
    assert name not in DBUS_ERROR_TO_EXCEPTION
    expected = explain(sdbus.SdBusUnmappedMessageError(name, "odd"))
    assert explain(BusError(name, "odd")) == expected
    assert "org.example.Error.Odd" in expected


def test_no_bus_reads_as_daemons_not_running() -> None:
    assert explain(NoBusError("refused")) == NOT_RUNNING


# ---------------------------------------------------------------- a real bus


def _zlayerctl(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from ctl.main import main; main()", *argv],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_reads_on_a_bus_without_daemons_say_which_is_missing(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    env = {**os.environ, PREFIX_ENV: str(tmp_path), BUS_ADDRESS_ENV: private_bus.address}
    expected = {
        ("ps",): "zlayer-schedd",
        ("routes",): "zlayer-proxyd",
        ("dns",): "zlayer-overlayd",
        ("image", "ls"): "zlayer-registryd",
        ("events", "-n", "5"): "zlayer-schedd",
        ("ps", "--containers"): "zlayer-agentd",
    }
    for argv, daemon in expected.items():
        result = _zlayerctl(env, *argv)
        assert result.returncode == 1, argv
        assert result.stdout == ""
        assert result.stderr == (
            f"error: {daemon} is not on the bus (it may be restarting); `zlayerctl status` "
            "shows which daemons run, and `zlayerctl daemon run --detach` (or `systemctl "
            "start zlayer.target`) starts them\n"
        ), argv
    status = _zlayerctl(env, "status")
    assert status.returncode == 3
    assert status.stderr == f"error: {NOT_RUNNING}\n"


def test_reads_with_no_bus_say_the_daemons_are_not_running(tmp_path: Path) -> None:
    env = {
        **os.environ,
        PREFIX_ENV: str(tmp_path),
        BUS_ADDRESS_ENV: f"unix:path={tmp_path}/no.sock",
    }
    for argv, code in ((("ps",), 1), (("image", "ls"), 1), (("status",), 3)):
        result = _zlayerctl(env, *argv)
        assert (result.returncode, result.stderr) == (code, f"error: {NOT_RUNNING}\n"), argv


def test_a_missing_bus_socket_is_said_without_loading_jeepney(tmp_path: Path) -> None:
    """No socket where a plain unix address points (no daemons running): NoBusError at once,
    jeepney never imported; other addresses are left to the connection to judge."""
    code = (
        "import sys\n"
        "from shared.busread import BusReader, NoBusError\n"
        "try:\n"
        f"    BusReader('unix:path={tmp_path}/no.sock,guid=0123')\n"
        "except NoBusError as exc:\n"
        "    print(exc)\n"
        "print('jeepney' in sys.modules)\n"
        "try:\n"
        f"    BusReader('unix:abstract={tmp_path}/no.sock')\n"
        "except NoBusError:\n"
        "    print('abstract refused by the connection', 'jeepney' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == [
        f"no bus socket at {tmp_path}/no.sock",
        "False",
        "abstract refused by the connection True",
    ], result.stderr


def test_the_bus_round_trip_works_against_a_real_dbus_daemon(private_bus: PrivateBus) -> None:
    """What the daemons' replies travel through: a call the bus itself answers, and an error."""
    with BusReader(private_bus.address) as bus:
        # ListDeployments to a name nobody owns: the bus's own error reply
        with pytest.raises(BusError) as raised:
            bus.list_deployments()
        assert raised.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"
        assert "org.zlayer.Scheduler1" in raised.value.message
        found = bus.statuses(list(busread.BUS_NAMES), 3.0)
        assert set(found) == set(busread.BUS_NAMES)
        assert all(isinstance(answer, BusError) for answer in found.values())


def test_a_signal_of_registryds_name_reaches_a_subscriber(private_bus: PrivateBus) -> None:
    """The bus matches the sender by the well-known name; the signal carries the unique one."""
    from jeepney import DBusAddress, new_signal
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    name = busread.BUS_NAMES["registryd"]
    with (
        open_dbus_connection(private_bus.address) as daemon,
        BusReader(private_bus.address) as bus,
    ):
        daemon.send_and_get_reply(message_bus.RequestName(name))
        signals = bus.subscribe(busread.JOB_REMOVED)
        at = DBusAddress(busread.object_path(name), interface=name)
        other = DBusAddress(busread.object_path(name) + "/job/7", interface=name)
        daemon.send(new_signal(other, "JobRemoved", "tos", (7, "/x", "{}")))  # not its path
        daemon.send(new_signal(at, "JobRemoved", "tos", (7, "/x", '{"id": 7}')))
        assert bus.wait(signals, 10.0) == ("JobRemoved", (7, "/x", '{"id": 7}'))
        with pytest.raises(TimeoutError):
            bus.wait(signals, 0.2)


@pytest.mark.parametrize(
    "argv",
    [["ps"], ["status"], ["routes", "--format", "json"], ["image", "ls"], ["events", "-n", "5"]],
    ids=" ".join,
)
def test_read_commands_import_no_click_asyncio_or_sdbus(
    private_bus: PrivateBus, tmp_path: Path, argv: list[str]
) -> None:
    modules = modules_after(
        "import os\n"
        f"os.environ['ZLAYER_PREFIX'] = {str(tmp_path)!r}\n"
        f"os.environ['ZLAYER_BUS_ADDRESS'] = {private_bus.address!r}\n"
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        *argv,
    )
    assert "jeepney" in modules
    assert "msgspec" in modules
    assert sorted(SLOW_IMPORTS & modules) == []


def test_other_commands_still_go_through_click(tmp_path: Path) -> None:
    modules = modules_after(
        "from ctl.main import main\ntry:\n    main()\nexcept SystemExit:\n    pass",
        "ps",
        "--help",
    )
    assert "click" in modules


def test_uuid_imported_with_the_platform_stand_in_knows_the_platform_as_it_would() -> None:
    """The read path imports msgspec (and so uuid) with a stand-in for ``platform``; uuid
    decides as with the real module, and a later ``import platform`` gets the real one."""
    probe = (
        "import json, sys\n"
        "from ctl.readargs import import_msgspec_lean\n"
        "import_msgspec_lean()\n"
        "import uuid\n"
        "seen = {'platform': 'platform' in sys.modules, 'linux': uuid._LINUX, 'aix': uuid._AIX}\n"
        "import platform\n"
        "seen['real'] = platform.__file__ is not None and platform.machine() != ''\n"
        "seen['system'] = platform.system()\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    import platform
    import uuid

    seen = json.loads(done.stdout)
    assert seen == {
        "platform": False,
        "linux": uuid._LINUX,  # type: ignore[attr-defined]
        "aix": uuid._AIX,  # type: ignore[attr-defined]
        "real": True,
        "system": platform.system(),
    }
