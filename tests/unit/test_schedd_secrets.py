"""schedd's secrets at rest: sealed with the node key, bound to their name and deployment,
resolved for `$S:` references; and a store from before secrets opens with them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from daemons.schedd.secrets import Secrets, SecretUnreadableError, missing, spec_references
from daemons.schedd.store import Store
from shared.bus import DAEMONS_BY_NAME, InvalidArgumentError, NotFoundError
from shared.nodekey import NodeKey
from shared.paths import Paths
from shared.spec import parse_spec
from shared.spec.refs import UnresolvedReferenceError, resolve_env, resolve_secrets
from tests.unit.test_units import (  # the real bus policy and schedd, as Plan is tested
    BUSCTL,
    SETPRIV,
    busctl,
    running_schedd,
    system_like_bus,  # noqa: F401 - a fixture
)

VALUE = "s3cr3t-VALUE-\u00e9-42"
PLAIN = "plain-Secret-Value-9a0c"  # busctl prints non-ASCII escaped

SPEC = """
version: v1
deployment: shop
services:
  web:
    image: zlayer/busybox
    env:
      DB: "postgres://app:$S:db-password@db/app"
      HOME_DIR: $E:HOME
  api:
    image: zlayer/busybox
    env: {TOKEN: $S:api-token}
  plain:
    image: zlayer/busybox
"""


@pytest.fixture
def secrets(tmp_path: Path) -> Secrets:
    key = NodeKey.load(Paths(tmp_path / "prefix"), environ={}).secrets_key()
    return Secrets(Store(tmp_path / "state.db"), lambda: key)


def test_a_value_is_sealed_on_disk_and_opens_again(tmp_path: Path, secrets: Secrets) -> None:
    first = secrets.set("db-password", "", VALUE)
    assert (first.version, first.deployment) == (1, "")
    assert VALUE not in repr(first)
    second = secrets.set("db-password", "", VALUE + "2")
    assert second.version == 2 and second.created_at == first.created_at
    assert secrets.open(secrets.require("db-password", "")) == VALUE + "2"
    secrets.store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert VALUE.encode() not in raw and (VALUE + "2").encode() not in raw


def test_a_row_moved_to_another_name_or_deployment_does_not_open(secrets: Secrets) -> None:
    secrets.set("a", "shop", VALUE)
    row = secrets.require("a", "shop")
    db = secrets.store._db
    db.execute("UPDATE secrets SET deployment = 'other' WHERE name = 'a'")
    with pytest.raises(SecretUnreadableError) as caught:
        secrets.open(secrets.require("a", "other"))
    assert VALUE not in str(caught.value) and "secret a of deployment other" in str(caught.value)
    db.execute("UPDATE secrets SET deployment = 'shop', name = 'b' WHERE name = 'a'")
    with pytest.raises(SecretUnreadableError):
        secrets.open(secrets.require("b", "shop"))
    assert row.ciphertext != VALUE.encode()


def test_a_different_node_key_does_not_open_a_secret(tmp_path: Path, secrets: Secrets) -> None:
    secrets.set("a", "", VALUE)
    other = Secrets(secrets.store, lambda: b"\x01" * 32)
    with pytest.raises(SecretUnreadableError, match="does not open with this node's key"):
        other.open(other.require("a", ""))


def test_the_deployments_own_secret_wins_over_the_node_wide_one(secrets: Secrets) -> None:
    secrets.set("db-password", "", "node")
    lookup = secrets.lookup("shop")
    assert lookup("db-password") == "node"
    secrets.set("db-password", "shop", "mine")
    assert lookup("db-password") == "mine"
    assert secrets.lookup("other")("db-password") == "node"
    assert secrets.lookup("shop")("nothing") is None


def test_names_and_sizes_are_checked_in_one_sentence(secrets: Secrets) -> None:
    with pytest.raises(InvalidArgumentError, match="is not a secret name"):
        secrets.set("../etc", "", "x")
    for looks_like_a_reference in ("pa$S:x", "$E:HOME"):
        with pytest.raises(InvalidArgumentError, match="would read as a reference"):
            secrets.set("odd", "", looks_like_a_reference)
    with pytest.raises(InvalidArgumentError, match="more than the 64 KiB"):
        secrets.set("big", "", "x" * (64 * 1024 + 1))
    with pytest.raises(NotFoundError, match="there is no secret gone of deployment shop"):
        secrets.require("gone", "shop")


def test_a_spec_with_secret_references_parses_and_keeps_them() -> None:
    spec = parse_spec(SPEC, "shop.yml")
    assert resolve_env(spec, {"HOME": "/root"}) == []
    assert spec.services["web"].env["DB"] == "postgres://app:$S:db-password@db/app"
    assert spec.services["web"].env["HOME_DIR"] == "/root"
    assert spec_references(spec) == {"web": {"db-password"}, "api": {"api-token"}}


def test_missing_secrets_are_named_one_sentence_each(secrets: Secrets) -> None:
    spec = parse_spec(SPEC, "shop.yml")
    problems = missing(spec, secrets)
    assert problems == [
        "services.web.env.DB: secret db-password is not set; set it with "
        "`zlayerctl secret set db-password` (add --deployment for this deployment only)",
        "services.api.env.TOKEN: secret api-token is not set; set it with "
        "`zlayerctl secret set api-token` (add --deployment for this deployment only)",
    ]
    secrets.set("db-password", "", VALUE)
    secrets.set("api-token", "shop", VALUE)
    assert missing(spec, secrets) == []


def test_resolving_substitutes_inside_a_longer_value() -> None:
    values = {"pw": VALUE}
    resolved = resolve_secrets("a:$S:pw@b and $S:pw", values.get, "x")
    assert resolved == f"a:{VALUE}@b and {VALUE}"
    # Values that, side by side, spell a reference are refused (agentd would read it as
    # one), naming the field and not the values.
    with pytest.raises(UnresolvedReferenceError, match="put together") as caught:
        resolve_secrets("$S:a$S:b", {"a": "x$", "b": "E:HOME"}.get, "services.w.env.K")
    assert str(caught.value).startswith("services.w.env.K:") and "x$" not in str(caught.value)
    with pytest.raises(UnresolvedReferenceError, match="another service"):
        resolve_secrets("$S:@api/pw", values.get, "x")


def test_a_store_from_before_secrets_opens_with_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE deployments (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, "
        "stopped INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    old.commit()
    old.close()
    store = Store(path)
    secrets = Secrets(store, lambda: b"\x02" * 32)
    secrets.set("a", "", VALUE)
    store.set_cron_enabled("shop", "nightly", False)
    assert store.cron_disabled("shop") == {"nightly"}
    store.close()
    store = Store(path)
    assert [s.name for s in store.secrets()] == ["a"]
    assert store.cron_disabled("shop") == {"nightly"}
    store.set_cron_enabled("shop", "nightly", True)
    assert store.cron_disabled("shop") == set()
    store.close()


def test_a_services_table_from_before_secrets_gains_its_digest_column(tmp_path: Path) -> None:
    from daemons.schedd.store import ServiceState

    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE services (deployment TEXT NOT NULL, service TEXT NOT NULL, "
        "serving INTEGER NOT NULL, target INTEGER NOT NULL, rollout TEXT NOT NULL DEFAULT '', "
        "message TEXT NOT NULL DEFAULT '', new_count INTEGER NOT NULL DEFAULT 0, "
        "old_count INTEGER NOT NULL DEFAULT 0, step_at REAL NOT NULL DEFAULT 0, "
        "adaptive INTEGER, scaled_at REAL NOT NULL DEFAULT 0, PRIMARY KEY (deployment, service))"
    )
    old.execute(
        "INSERT INTO services (deployment, service, serving, target) VALUES ('a', 'w', 1, 1)"
    )
    old.commit()
    old.close()
    store = Store(path)
    assert store.service_states("a") == {"w": ServiceState(1, 1)}
    store.put_service_state("a", "w", ServiceState(1, 2, rollout="running", secrets="abc"))
    assert store.service_states("a")["w"].secrets == "abc"
    store.close()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to call as another user")
@pytest.mark.skipif(BUSCTL is None or SETPRIV is None, reason="needs busctl and setpriv")
def test_only_root_may_call_the_secret_and_cron_methods(
    system_like_bus: str,  # noqa: F811 - the fixture imported above
    zlayer_prefix: Paths,
) -> None:
    """Another user cannot set, list, read or remove a secret, nor switch a cron job: the
    bus refuses the call before schedd sees it; root gets through (schedd answers)."""
    info_ = DAEMONS_BY_NAME["schedd"]
    target = (info_.bus_name, info_.object_path, info_.bus_name)
    calls = (
        ("SetSecret", "sss", "pw", "", PLAIN),
        ("ListSecrets",),
        ("GetSecret", "ss", "pw", ""),
        ("RemoveSecret", "ss", "pw", ""),
        ("SetCronEnabled", "ssb", "shop", "nightly", "false"),
    )
    with running_schedd(system_like_bus, zlayer_prefix):
        for method, *args in calls:
            nobody = busctl(system_like_bus, "call", *target, method, *args, as_nobody=True)
            assert nobody.returncode != 0 and "Access denied" in nobody.stderr, (method, nobody)
            assert PLAIN not in nobody.stdout
        stored = busctl(system_like_bus, "call", *target, "SetSecret", "sss", "pw", "", PLAIN)
        assert stored.returncode == 0 and PLAIN not in stored.stdout, stored.stderr
        got = busctl(system_like_bus, "call", *target, "GetSecret", "ss", "pw", "")
        assert got.returncode == 0 and PLAIN in got.stdout, got.stderr
        listed = busctl(system_like_bus, "call", *target, "ListSecrets")
        assert listed.returncode == 0 and '\\"pw\\"' in listed.stdout
        assert PLAIN not in listed.stdout
        gone = busctl(system_like_bus, "call", *target, "RemoveSecret", "ss", "pw", "")
        assert gone.returncode == 0, gone.stderr
