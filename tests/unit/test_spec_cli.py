"""zlayerctl validate, spec dump and spec schema through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from ctl.main import cli
from tests.unit.test_spec_examples import UPSTREAM_VALID

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
UPSTREAM = REPO / "tests" / "data" / "upstream-examples"
BROKEN = """\
version: v1
deployment: app
services:
  web:
    image: nginx
    volumes: []
    endpoints:
      - {name: http, protocol: http, port: 70000}
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_validate_a_valid_file(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["validate", str(EXAMPLES / "multi-service.zlayer.yml")])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    for name in ("web", "api", "db"):
        assert name in result.output
    assert "fixed 2" in result.output
    assert "adaptive 2-8" in result.output
    assert "http:80/http public" in result.output


def test_validate_an_invalid_file_lists_every_issue(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "app.zlayer.yml"
    spec.write_text(BROKEN)
    result = runner.invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 1
    assert f"{spec}:6:5: services.web.volumes: unknown key `volumes`" in result.output
    assert f"{spec}:8:44: services.web.endpoints[0].port: must be between 1" in result.output
    assert "2 problems" in result.output
    assert "Traceback" not in result.output


def test_validate_json(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "app.zlayer.yml"
    spec.write_text(BROKEN)
    result = runner.invoke(cli, ["validate", "--format", "json", str(spec)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert {i["path"] for i in report["issues"]} == {
        "services.web.volumes",
        "services.web.endpoints[0].port",
    }
    ok = runner.invoke(
        cli, ["validate", "--format", "json", str(EXAMPLES / "static-web.zlayer.yml")]
    )
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["services"][0]["scale"] == "fixed 3"


def test_validate_finds_the_one_spec_in_the_directory(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(EXAMPLES / "cron.zlayer.yml", tmp_path / "nightly.zlayer.yaml")
    (tmp_path / "notes.yml").write_text("not a spec\n")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("nightly.zlayer.yaml: valid")


def test_validate_with_no_spec_here(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 2
    assert "no *.zlayer.yml or *.zlayer.yaml file in the current directory" in result.output


def test_validate_with_several_specs_here(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(EXAMPLES / "job.zlayer.yml", tmp_path / "a.zlayer.yml")
    shutil.copy(EXAMPLES / "cron.zlayer.yml", tmp_path / "b.zlayer.yaml")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["validate"])
    assert result.exit_code == 2
    assert "several spec files" in result.output
    assert "a.zlayer.yml, b.zlayer.yaml" in result.output


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "the file is empty"),
        (b"version: v1\n---\nversion: v1\n", "second YAML document"),
        (b"\xff\xfe\x00v", "UTF-16"),
        (b"version: v1\ndeployment: caf\xe9\n", "not UTF-8"),
        (b"- a\n- b\n", "top level must be a mapping"),
        (b"version: [v1\n", "invalid YAML"),
    ],
)
def test_validate_never_shows_a_traceback(
    runner: CliRunner, tmp_path: Path, content: bytes, fragment: str
) -> None:
    spec = tmp_path / "x.zlayer.yml"
    spec.write_bytes(content)
    result = runner.invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_validate_a_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["validate", str(tmp_path / "nope.zlayer.yml")])
    assert result.exit_code == 1
    assert "no such file" in result.output


def test_spec_dump_yaml_fills_defaults(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["spec", "dump", str(EXAMPLES / "job.zlayer.yml")])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    job = data["services"]["migrate"]
    assert job["image"] == {"name": "zlayer/busybox:latest", "pull_policy": "if_not_present"}
    assert job["restart_policy"] == {"kind": "on_failure", "max_attempts": 3, "delay": "10s"}
    assert job["resources"]["memory"] == "64Mi"
    assert job["health"]["retries"] == 3


def test_spec_dump_json(runner: CliRunner) -> None:
    result = runner.invoke(
        cli, ["spec", "dump", "--format", "json", str(UPSTREAM / "examples_simple.zlayer.yml")]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["services"]["web"]["scale"] == {"mode": "fixed", "replicas": 2}


def test_spec_dump_of_a_broken_file(runner: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "app.zlayer.yml"
    spec.write_text(BROKEN)
    result = runner.invoke(cli, ["spec", "dump", str(spec)])
    assert result.exit_code == 1
    assert "services.web.volumes" in result.output


def test_spec_schema_is_json_schema_that_checks_specs(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["spec", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    valid_upstream = [UPSTREAM / name for name in UPSTREAM_VALID]
    for path in [*sorted(EXAMPLES.glob("*.zlayer.yml")), *valid_upstream]:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, f"{path.name}: {errors[0].message}"
    broken = yaml.safe_load(BROKEN)
    assert list(validator.iter_errors(broken)), "the schema must reject `volumes`"
