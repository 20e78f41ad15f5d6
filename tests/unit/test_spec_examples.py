"""Our examples validate; upstream's own pass or fail as upstream's parser would."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.spec import SpecError, dump_spec, load_spec, parse_spec, spec_to_data

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.zlayer.yml"))
UPSTREAM = REPO / "tests" / "data" / "upstream-examples"

# Upstream files its own parser rejects, with the pointed message each must give.
UPSTREAM_INVALID: dict[str, list[tuple[str, str]]] = {
    "examples_containers_multi-service_deployment.yaml": [
        ("services.web.volumes", "did you mean `storage`?"),
        ("services.database.volumes", "did you mean `storage`?"),
        ("services.database.health.check.type", "did you mean `command`?"),
        ("services.api.init.steps[1].uses", "did you mean `init.run`?"),
    ],
    "examples_containers_postgres-db_deployment.yaml": [
        ("services.database.volumes", "did you mean `storage`?"),
    ],
    "examples_containers_redis-cache_deployment.yaml": [
        ("", "a second YAML document starts here"),
        # the first document is still checked, so its own error shows in the same run
        ("services.cache.health.check.type", "did you mean `command`?"),
    ],
    "examples_wasm_deployment.yaml": [
        ("services.rust-hello.runtime", "WebAssembly settings go in `wasm`"),
        ("services.go-hello.runtime", "WebAssembly settings go in `wasm`"),
    ],
    # Its cron job has no schedule, which upstream's validator refuses too.
    "examples_full-service.yaml": [
        ("services.cleanup.rtype", "a cron job needs a `schedule`"),
    ],
}
UPSTREAM_VALID = sorted(
    p.name
    for p in UPSTREAM.iterdir()
    if p.suffix in (".yml", ".yaml") and p.name not in UPSTREAM_INVALID
)


def test_the_upstream_copy_keeps_its_attribution() -> None:
    readme = (UPSTREAM / "README.md").read_text()
    assert "Apache-2.0" in readme
    assert len(UPSTREAM_VALID) >= 10


def test_there_are_five_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "static-web.zlayer.yml",
        "multi-service.zlayer.yml",
        "job.zlayer.yml",
        "cron.zlayer.yml",
        "adaptive.zlayer.yml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert spec.services
    for fmt in ("yaml", "json"):
        again = parse_spec(dump_spec(spec, fmt), f"dump.{fmt}")  # type: ignore[arg-type]
        assert again == spec


def test_static_web_example_is_what_it_says() -> None:
    spec = load_spec(REPO / "examples" / "static-web.zlayer.yml")
    web = spec.services["web"]
    assert web.image.name == "zlayer/busybox:latest"
    assert spec_to_data(spec)["services"]["web"]["scale"] == {"mode": "fixed", "replicas": 3}
    assert [e.protocol for e in web.endpoints] == ["http", "tcp"]


@pytest.mark.parametrize("name", UPSTREAM_VALID)
def test_upstream_valid_example_loads(name: str) -> None:
    spec = load_spec(UPSTREAM / name)
    assert spec.version == "v1"
    again = parse_spec(dump_spec(spec), name)
    assert again == spec


@pytest.mark.parametrize("name", sorted(UPSTREAM_INVALID))
def test_upstream_invalid_example_fails_pointedly(name: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(UPSTREAM / name)
    issues = caught.value.issues
    for path, fragment in UPSTREAM_INVALID[name]:
        matching = [i for i in issues if i.path == path and fragment in i.message]
        assert matching, f"no issue at {path!r} saying {fragment!r} in:\n{caught.value}"
        assert all(i.line > 0 and i.column > 0 for i in matching)
