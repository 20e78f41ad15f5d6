"""registryd's client side without a registry: which manifest of an index a node
takes, what a ``WWW-Authenticate`` header asks for, where credentials are read
and written, how short names resolve, and what ``system prune`` removes."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemons.registryd.auth import CredentialStore, parse_challenge
from daemons.registryd.client import normalise_registry, parse_user_reference
from daemons.registryd.distribution import (
    Platform,
    choose_manifest,
    registry_url,
    select_manifest,
)
from daemons.registryd.store import ImageStore
from shared.bus import InvalidArgumentError, NotFoundError
from shared.busybox_image import Entry, make_image, make_tar, write_oci_layout
from shared.credentials import Credential, user_auth_files, user_credential

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
ARM7 = Platform("linux", "arm", "v7")


def digest(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def entry(n: int, os_name: str | None = None, arch: str = "", variant: str = "") -> dict[str, Any]:
    descriptor: dict[str, Any] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest(n)[:71],
        "size": 500,
    }
    if os_name is not None:
        descriptor["platform"] = {"os": os_name, "architecture": arch}
        if variant:
            descriptor["platform"]["variant"] = variant
    return descriptor


def index(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"schemaVersion": 2, "manifests": list(entries)}


# ---------------------------------------------------------------- platforms

MULTI = index(
    entry(1, "linux", "arm", "v6"),
    entry(2, "linux", "arm", "v7"),
    entry(3, "linux", "arm64", "v8"),
    entry(4, "linux", "amd64"),
    entry(5, "windows", "amd64"),
    entry(6, "unknown", "unknown"),  # an attestation manifest
)


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        (AMD64, 4),
        (ARM64, 3),
        (ARM7, 2),
        (Platform("linux", "arm", "v6"), 1),
        (Platform("windows", "amd64"), 5),
    ],
)
def test_each_platform_takes_its_own_manifest(wanted: Platform, expected: int) -> None:
    assert choose_manifest(MULTI, wanted, "app:1") == entry(expected)["digest"]


def test_an_exact_variant_beats_none_and_none_beats_an_older_variant() -> None:
    bare_first = index(entry(1, "linux", "arm64"), entry(2, "linux", "arm64", "v8"))
    assert select_manifest(bare_first, ARM64) == bare_first["manifests"][1]
    older = index(entry(1, "linux", "arm", "v6"), entry(2, "linux", "arm"))
    assert choose_manifest(older, ARM7, "app") == entry(2)["digest"]
    # Only an older variant the CPU runs: taken; a newer one never is.
    assert choose_manifest(index(entry(1, "linux", "arm", "v6")), ARM7, "app") == entry(1)["digest"]
    with pytest.raises(NotFoundError):
        choose_manifest(index(entry(1, "linux", "arm", "v7")), Platform("linux", "arm", "v6"), "a")


def test_the_first_of_equal_matches_wins_and_broken_entries_are_skipped() -> None:
    doc = index(
        {"platform": {"os": "linux", "architecture": "amd64"}},  # no digest
        "not a descriptor",  # type: ignore[arg-type]
        entry(7, "linux", "amd64"),
        entry(8, "linux", "amd64"),
    )
    assert choose_manifest(doc, AMD64, "app") == entry(7)["digest"]


def test_nested_indexes_are_followed_through_entries_without_a_platform() -> None:
    # The outer index names only another index (no platform); that one has the images.
    outer = index(entry(9), entry(3, "linux", "arm64", "v8"))
    inner = index(entry(4, "linux", "amd64"), entry(5, "linux", "s390x"))
    documents = {entry(9)["digest"]: inner}
    chosen = choose_manifest(outer, AMD64, "app")
    assert chosen == entry(9)["digest"]
    assert choose_manifest(documents[chosen], AMD64, "app") == entry(4)["digest"]
    # A platform the outer index lists wins over descending into the nested one.
    assert choose_manifest(outer, ARM64, "app") == entry(3)["digest"]


def test_no_match_is_one_sentence_listing_what_there_is() -> None:
    with pytest.raises(NotFoundError) as caught:
        choose_manifest(MULTI, Platform("linux", "riscv64"), "example.com/app:2")
    assert str(caught.value) == (
        "example.com/app:2 has no image for this node's platform linux/riscv64 (it has: "
        "linux/arm/v6, linux/arm/v7, linux/arm64/v8, linux/amd64, windows/amd64)"
    )
    with pytest.raises(NotFoundError) as caught:
        choose_manifest(index(), AMD64, "app:1")
    assert str(caught.value).endswith("(it has: no platform at all)")


# ---------------------------------------------------------------- challenges


def test_a_bearer_challenge_gives_realm_service_and_scope() -> None:
    found = parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:team/app:pull,push"'
    )
    assert found is not None
    assert found.scheme == "bearer"
    assert found.realm == "https://auth.example.com/token"
    assert found.service == "registry.example.com"
    assert found.scope == "repository:team/app:pull,push"


def test_challenge_parameters_may_be_unquoted_spaced_escaped_and_any_case() -> None:
    found = parse_challenge(
        'BEARER Realm=https://auth.example.com/token , service = "a \\"quoted\\" name"'
    )
    assert found is not None
    assert (found.scheme, found.realm, found.service) == (
        "bearer",
        "https://auth.example.com/token",
        'a "quoted" name',
    )


def test_a_basic_challenge() -> None:
    found = parse_challenge('Basic realm="Registry Realm"')
    assert found is not None
    assert (found.scheme, found.realm, found.service) == ("basic", "Registry Realm", "")


def test_only_the_first_of_several_challenges_counts() -> None:
    found = parse_challenge('Basic realm="first", Bearer realm="https://second/token",service="s"')
    assert found is not None
    assert found.scheme == "basic"
    assert found.params == {"realm": "first"}


@pytest.mark.parametrize("header", ["", "   ", 'realm="x"', '"Bearer" realm="x"', "=Bearer"])
def test_a_header_without_a_scheme_is_no_challenge(header: str) -> None:
    assert parse_challenge(header) is None


def test_a_bearer_challenge_without_parameters_has_no_realm() -> None:
    found = parse_challenge("Bearer")
    assert found is not None
    assert (found.scheme, found.realm) == ("bearer", "")
    garbled = parse_challenge('Bearer realm="https://a/token" ,,, junk')
    assert garbled is not None
    assert garbled.realm == "https://a/token"


# ---------------------------------------------------------------- credentials


def encoded(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def test_login_writes_a_0600_docker_format_file_and_logout_removes_the_entry(
    tmp_path: Path,
) -> None:
    store = CredentialStore(tmp_path / "state" / "auth.json", system_file=tmp_path / "none")
    store.set("registry.example.com", Credential("alice", "s3:cr3t"))
    store.set("docker.io", Credential("bob", "pw"))
    mode = stat.S_IMODE((tmp_path / "state" / "auth.json").stat().st_mode)
    assert mode == 0o600
    document = json.loads((tmp_path / "state" / "auth.json").read_text())
    assert document == {
        "auths": {
            "registry.example.com": {"auth": encoded("alice", "s3:cr3t")},
            "docker.io": {"auth": encoded("bob", "pw")},
        }
    }
    assert store.get("registry.example.com") == Credential("alice", "s3:cr3t")
    assert store.get("docker.io") == Credential("bob", "pw")
    assert store.remove("registry.example.com") is True
    assert store.remove("registry.example.com") is False
    assert store.get("registry.example.com") is None
    assert store.get("docker.io") == Credential("bob", "pw")
    assert stat.S_IMODE((tmp_path / "state" / "auth.json").stat().st_mode) == 0o600
    assert list((tmp_path / "state").iterdir()) == [tmp_path / "state" / "auth.json"]


def test_login_keeps_what_else_the_file_holds_and_logout_finds_old_spellings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps(
            {
                "auths": {"https://registry.example.com/v1/": {"auth": encoded("old", "x")}},
                "credHelpers": {"gcr.io": "gcloud"},
            }
        )
    )
    path.chmod(0o644)
    store = CredentialStore(path, system_file=tmp_path / "none")
    assert store.get("registry.example.com") == Credential("old", "x")
    store.set("other.example.com:5000", Credential("carol", "pw"))
    assert json.loads(path.read_text())["credHelpers"] == {"gcr.io": "gcloud"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.remove("registry.example.com") is True
    assert store.get("registry.example.com") is None
    assert store.get("other.example.com:5000") == Credential("carol", "pw")


def test_an_unreadable_credential_file_is_moved_aside_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text('{"auths": {"a.example.com": ')
    store = CredentialStore(path, system_file=tmp_path / "none")
    assert store.get("a.example.com") is None
    store.set("b.example.com", Credential("u", "p"))  # a login works again
    (aside,) = tmp_path.glob("auth.json.corrupt-*")
    assert aside.read_text() == '{"auths": {"a.example.com": '  # kept as it was
    assert store.get("b.example.com") == Credential("u", "p")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_system_file_is_read_after_registryds_own(tmp_path: Path) -> None:
    system = tmp_path / "system.json"
    system.write_text(json.dumps({"auths": {"a.example.com": {"auth": encoded("sys", "1")}}}))
    store = CredentialStore(tmp_path / "own.json", system_file=system)
    assert store.get("a.example.com") == Credential("sys", "1")
    store.set("a.example.com", Credential("own", "2"))
    assert store.get("a.example.com") == Credential("own", "2")


def write_auth(path: Path, auths: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_a_users_docker_and_podman_files_in_both_forms(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runtime = tmp_path / "run"
    write_auth(
        home / ".docker" / "config.json",
        {
            "https://index.docker.io/v1/": {"auth": encoded("hubuser", "hubpw")},
            "docker.example.com": {"auth": encoded("dock", "er")},
            "plain.example.com": {"username": "plain", "password": "pa:ss"},
            "broken.example.com": {"auth": "%%% not base64", "username": "u", "password": "p"},
        },
    )
    write_auth(
        runtime / "containers" / "auth.json",
        {"docker.example.com": {"auth": encoded("podman", "wins")}},
    )
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}

    def cred(registry: str) -> Credential | None:
        found = user_credential(registry, env)
        return Credential.decode(found) if found else None

    assert cred("docker.io") == Credential("hubuser", "hubpw")
    assert cred("docker.example.com") == Credential("podman", "wins")
    assert cred("plain.example.com") == Credential("plain", "pa:ss")
    assert cred("broken.example.com") == Credential("u", "p")
    assert cred("nowhere.example.com") is None
    assert user_credential("nowhere.example.com", {}) == ""


def test_which_user_files_are_read_and_in_what_order(tmp_path: Path) -> None:
    env = {
        "REGISTRY_AUTH_FILE": "/a/auth.json",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "HOME": "/home/u",
        "DOCKER_CONFIG": "/d",
    }
    assert user_auth_files(env, uid=1000) == [
        "/a/auth.json",
        "/run/user/1000/containers/auth.json",
        "/home/u/.config/containers/auth.json",
        "/d/config.json",
    ]
    # Root without a runtime directory: where `podman login` puts it.
    assert user_auth_files({"HOME": "/root"}, uid=0) == [
        "/run/containers/0/auth.json",
        "/root/.config/containers/auth.json",
        "/root/.docker/config.json",
    ]


def test_a_decoded_auth_field_needs_a_user_and_a_colon() -> None:
    assert Credential.decode(encoded("u", "p:q")) == Credential("u", "p:q")
    assert Credential.decode(base64.b64encode(b"nocolon").decode()) is None
    assert Credential.decode(base64.b64encode(b":pw").decode()) is None
    assert Credential.decode("not base64!") is None
    assert Credential("u", "p").basic() == "Basic " + encoded("u", "p")


# ---------------------------------------------------------------- short names


@pytest.mark.parametrize(
    ("typed", "domain", "path", "tag"),
    [
        ("busybox", "docker.io", "library/busybox", "latest"),
        ("zlayer/busybox:1", "docker.io", "zlayer/busybox", "1"),
        ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest"),
        ("localhost/app", "localhost", "app", "latest"),
        ("127.0.0.1:5000/team/app:2", "127.0.0.1:5000", "team/app", "2"),
        ("registry.example.com/app", "registry.example.com", "app", "latest"),
    ],
)
def test_short_names_resolve_to_a_registry_and_repository(
    typed: str, domain: str, path: str, tag: str
) -> None:
    ref = parse_user_reference(f"  {typed} ")
    assert (ref.domain, ref.path, ref.tag) == (domain, path, tag)


def test_a_bad_name_is_one_sentence() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_user_reference("Team/App")
    assert str(caught.value) == "the repository name in 'Team/App' must be lowercase"


@pytest.mark.parametrize(
    ("typed", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
        ("registry.example.com/some/path", "registry.example.com"),
    ],
)
def test_login_names_a_registry_by_its_host(typed: str, host: str) -> None:
    assert normalise_registry(typed) == host


def test_login_without_a_host_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="give a registry host name"):
        normalise_registry("https://")


def test_which_registries_are_spoken_to_over_plain_http() -> None:
    assert registry_url("docker.io", []) == "https://registry-1.docker.io"
    assert registry_url("127.0.0.1:5000", []) == "http://127.0.0.1:5000"
    assert registry_url("localhost:5000", []) == "http://localhost:5000"
    assert registry_url("registry.example.com", []) == "https://registry.example.com"
    assert registry_url("lan:5000", ["lan:5000"]) == "http://lan:5000"


# ---------------------------------------------------------------- the store and prune


def layer(name: str, content: bytes) -> bytes:
    return make_tar([Entry("data", "dir", mode=0o755), Entry(f"data/{name}", "file", content)])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    found = ImageStore(tmp_path / "store")
    found.open()
    yield found


def add(store: ImageStore, tmp_path: Path, name: str, *layers: bytes) -> str:
    image = make_image(list(layers), name, cmd=["true"], Labels={"name": name})
    layout = write_oci_layout(image, tmp_path / name.replace("/", "_").replace(":", "_"))
    (info,) = store.import_path(str(layout), name)
    return info.id


def test_short_names_find_stored_images(store: ImageStore, tmp_path: Path) -> None:
    image_id = add(store, tmp_path, "docker.io/library/tool:latest", layer("a", b"a"))
    for typed in ("tool", "tool:latest", "library/tool", "docker.io/library/tool"):
        found = store.find(typed)
        assert found is not None and found == (store.images[image_id], True), typed
    assert store.find("tool:2") is None
    assert store.find(image_id.removeprefix("sha256:")[:8]) == (store.images[image_id], False)


def test_prune_removes_images_no_replica_uses_and_only_their_own_blobs(
    store: ImageStore, tmp_path: Path
) -> None:
    shared_layer = layer("shared", b"both images have this")
    used = add(store, tmp_path, "example.com/used:1", shared_layer, layer("u", b"used only"))
    unused = add(store, tmp_path, "example.com/unused:1", shared_layer, layer("n", b"unused"))
    used_blobs = {used, store.images[used].manifest_digest, *store.images[used].layers}
    unused_only = {
        unused,
        store.images[unused].manifest_digest,
        *store.images[unused].layers,
    } - used_blobs
    assert len(unused_only) == 3  # its config, its manifest, its own layer
    (store.partial_dir / ("a" * 64)).write_bytes(b"an abandoned download")
    (store.partial_dir / ("b" * 64)).write_bytes(b"a pull in progress")

    images, blobs = store.prune({used}, {"sha256:" + "b" * 64})

    assert images == ["example.com/unused:1"]
    assert set(blobs) == unused_only
    assert set(store.images) == {used}
    for blob in used_blobs:
        assert store.has_blob(blob), blob
    for diff_id in store.images[used].diff_ids:
        assert store.layer_path(diff_id).is_dir()
    assert sorted(p.name for p in store.layer_dir.iterdir()) == sorted(
        d.removeprefix("sha256:") for d in store.images[used].diff_ids
    )
    assert [p.name for p in store.partial_dir.iterdir()] == ["b" * 64]
    assert store.find("example.com/unused:1") is None
    # Nothing left to remove: a second prune changes nothing.
    assert store.prune({used}, set()) == ([], [])
    reopened = ImageStore(store.root)
    reopened.open()
    assert set(reopened.images) == {used}


def test_prune_keeps_what_a_pull_or_push_has_pinned_and_names_nameless_images_by_id(
    store: ImageStore, tmp_path: Path
) -> None:
    pinned_id = add(store, tmp_path, "example.com/pinned:1", layer("p", b"pinned"))
    other_id = add(store, tmp_path, "example.com/other:1", layer("o", b"other"))
    store.remove("example.com/other:1", force=False)
    nameless = add(store, tmp_path, "example.com/other:1", layer("o", b"other"))
    assert nameless == other_id
    store.images[other_id] = msgspec.structs.replace(store.images[other_id], names=[])
    pins = store.pin(pinned_id)
    try:
        images, _ = store.prune(set(), set())
    finally:
        store.unpin(pins)
    assert images == [other_id]
    assert set(store.images) == {pinned_id}
    images, _ = store.prune(set(), set())
    assert images == ["example.com/pinned:1"]
    assert store.images == {}
    assert list(store.blob_dir.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
def test_an_unusable_index_is_moved_aside_and_the_images_taken_back_from_the_blobs(
    store: ImageStore, tmp_path: Path, damage: str
) -> None:
    first = add(store, tmp_path, "example.com/first:1", layer("a", b"a"), layer("b", b"b"))
    second = add(store, tmp_path, "example.com/second:1", layer("c", b"c"))
    before = {k: msgspec.structs.replace(v, imported_at=0.0) for k, v in store.images.items()}
    text = store.index_path.read_bytes()
    if damage == "truncated":
        store.index_path.write_bytes(text[: len(text) // 2])
    elif damage == "garbage":
        store.index_path.write_bytes(b"\x00\xff not an index")
    else:
        store.index_path.unlink()

    reopened = ImageStore(store.root)
    reopened.open()  # starts, never deletes the blobs of images it cannot name

    assert set(reopened.images) == {first, second}
    for image_id, record in reopened.images.items():
        assert record.names == []  # the names were only in the index
        expected = msgspec.structs.replace(before[image_id], names=[])
        assert msgspec.structs.replace(record, imported_at=0.0) == expected
        assert reopened._complete(record)
    aside = list(store.root.glob("index.json.corrupt-*"))
    assert len(aside) == (0 if damage == "deleted" else 1)
    # The rebuilt index is saved, and a pull or import names the image again.
    assert ImageStore(store.root)._load_index().keys() == {first, second}
    again = add(
        reopened, tmp_path / "again", "example.com/first:1", layer("a", b"a"), layer("b", b"b")
    )
    assert again == first and reopened.find("example.com/first:1") is not None
