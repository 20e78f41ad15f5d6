"""Daemon configuration: file, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons.apid.main import ApiSettings
from shared.config import ConfigError, DaemonSettings
from shared.paths import Paths


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = DaemonSettings.load("schedd", Paths(tmp_path))
    assert settings.metrics_port is None
    assert settings.log_level == "info"


def test_file_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.daemon_config("apid").write_text(
        'metrics_port = 9400\nhttp_port = 8080\nlog_level = "debug"\n'
    )
    monkeypatch.setenv("ZLAYER_APID_HTTP_PORT", "8081")
    settings = ApiSettings.load("apid", paths)
    assert settings.metrics_port == 9400
    assert settings.http_port == 8081
    assert settings.log_level == "debug"


def test_environment_of_another_daemon_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZLAYER_AGENTD_METRICS_PORT", "1234")
    assert DaemonSettings.load("schedd", Paths(tmp_path)).metrics_port is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("metrics_port = [", "is not valid TOML"),
        ("metrics_port = 70000", "`metrics_port`"),
        ("metrcs_port = 1", "`metrcs_port`"),
        ('log_level = "loud"', "`log_level`"),
    ],
)
def test_bad_file_is_one_sentence(tmp_path: Path, text: str, expected: str) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.daemon_config("schedd").write_text(text)
    with pytest.raises(ConfigError) as info:
        DaemonSettings.load("schedd", paths)
    message = str(info.value)
    assert expected in message
    assert str(paths.daemon_config("schedd")) in message
    assert "\n" not in message


def test_prefix_moves_every_directory(tmp_path: Path) -> None:
    paths = Paths.from_env({"ZLAYER_PREFIX": str(tmp_path)})
    for directory in (paths.config_dir, paths.state_dir, paths.run_dir, paths.log_dir):
        assert directory.is_relative_to(tmp_path)
    assert Paths.from_env({}).config_dir == Path("/etc/zlayer")
