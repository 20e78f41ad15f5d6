"""The pure parts of agentd's process handling: the runtime's errors as phrases,
signal names, an exec's command line and exit code, and the log files' order."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from daemons.agentd import logs, oci
from daemons.agentd.errors import ContainerError


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (
            'exec: "nope": executable file `nope` not found in $PATH',
            'exec: "nope": not found in the image',
        ),
        ("crun: exec /bin/x: Permission denied", 'exec: "/bin/x": permission denied'),
        ('{"msg": "setrlimit `RLIMIT_NOFILE`: Operation not permitted"}', "a resource limit"),
        ("crun: something odd happened", "something odd happened"),
        ("", "the runtime gave no reason"),
    ],
)
def test_explain_turns_runtime_output_into_a_phrase(raw: str, phrase: str) -> None:
    assert oci.explain(raw).startswith(phrase)


def test_signal_names_and_numbers() -> None:
    assert oci.signal_number("term") == signal.SIGTERM
    assert oci.signal_number("SIGKILL") == signal.SIGKILL
    assert oci.signal_number(" 9 ") == 9
    assert oci.signal_number(15) == 15
    with pytest.raises(ContainerError, match="not a signal name"):
        oci.signal_number("SIGNOPE")


def test_exec_args_carry_the_options_before_the_container() -> None:
    args = oci.exec_args("web-1", ["sh", "-c", "id"], True, {"A": "1"}, "1000", "/tmp")
    assert args == [
        "exec",
        "--tty",
        "--env",
        "A=1",
        "--user",
        "1000",
        "--cwd",
        "/tmp",
        "web-1",
        "sh",
        "-c",
        "id",
    ]
    assert oci.exec_args("web-1", ["true"], False, None, None, None) == ["exec", "web-1", "true"]


def test_exec_exit_codes_read_as_a_shell_gives_them() -> None:
    assert oci.exec_exit_code(0, b"") == 0
    assert oci.exec_exit_code(None, None) == oci.UNKNOWN_EXIT
    assert oci.exec_exit_code(-9, None) == 137
    missing = b'exec: "nope": executable file `nope` not found in $PATH'
    assert oci.exec_exit_code(1, missing) == 127
    assert oci.exec_exit_code(1, b"exec /bin/x: Permission denied") == 126
    # The caller took stderr: the code stays the runtime's.
    assert oci.exec_exit_code(1, None) == 1


def test_log_paths_list_the_rotated_files_oldest_first(tmp_path: Path) -> None:
    for name in ("ctr.log", "ctr.log.1", "ctr.log.3"):
        (tmp_path / name).write_text("")
    assert [p.name for p in logs.log_paths(tmp_path, 3)] == ["ctr.log.3", "ctr.log.1", "ctr.log"]
    assert [p.name for p in logs.log_paths(tmp_path, 1)] == ["ctr.log.1", "ctr.log"]
