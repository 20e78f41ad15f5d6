"""zlayer-registryd pulling from a real registry (Debian's docker-registry), through zlayerctl.

The registries hold images skopeo put there. Faults come from a small proxy
in front of the registry (tampered blob, a connection cut half way, a slow
blob) and from killing registryd by PID mid-pull. Layers are unpacked as
they download: their trees must be those an import of the same image makes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.supervisor import find_executable
from shared import busybox_image as builder
from shared.bus import NotFoundError, UnavailableError
from shared.busybox_image import Compression
from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import (
    PASSWORD,
    USER,
    Registry,
    TokenServer,
    fault_proxy,
    free_port,
    htpasswd_auth,
    need_tools,
    oci_manifest_digest,
    put_manifest,
    skopeo_copy,
    start_registry,
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def pulled(registryd: Registryd, reference: str, *extra: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(registryd.ok("pull", reference, "--format", "json", *extra))
    return info


def ctl_with_stdin(registryd: Registryd, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [find_executable("zlayerctl"), *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_no_partials(registryd: Registryd) -> None:
    assert os.listdir(registryd.store / "partial") == []
    assert os.listdir(registryd.store / "tmp") == []


# ---------------------------------------------------------------- anonymous pull


def test_anonymous_pull_stores_unpacks_and_shares_blobs_with_imports(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path]
) -> None:
    out = registryd.ok("pull", f"{registry.host}/busybox:1")
    name = f"{registry.host}/busybox:1"
    info = registryd.images()[0]
    assert out.strip() == f"pulled {name}: {info['id']}"
    assert info["names"] == [name]
    assert info["manifest_digest"] == oci_manifest_digest(busybox_image["oci"])
    assert len(registryd.blobs()) == 3 and len(registryd.layers()) == 1
    rootfs = registryd.ensure(name, "never")
    assert os.access(Path(rootfs.lower_dirs[0]) / "bin/busybox", os.X_OK)
    assert rootfs.config.cmd == ["sh"]
    assert_no_partials(registryd)

    # The import of the same image finds every blob and layer already there.
    blobs, layers = registryd.blobs(), registryd.layers()
    imported = registryd.import_(busybox_image["oci"])
    assert imported.id == info["id"] and registryd.blobs() == blobs
    assert registryd.layers() == layers

    # A second pull asks the registry, finds the same manifest, fetches nothing.
    again = pulled(registryd, name)
    assert again["id"] == info["id"]
    jobs = json.loads(registryd.call("list_jobs"))
    assert [job["kind"] for job in jobs] == ["pull", "pull"]
    assert all(job["state"] == "done" for job in jobs)
    assert [item["state"] for item in jobs[-1]["items"]] == ["exists"]
    assert jobs[0]["items"][0]["total"] == jobs[0]["items"][0]["done"] > 100_000


def test_multi_platform_index_picks_this_node(
    registryd: Registryd, registry: Registry, workdir: Path
) -> None:
    native = builder.busybox_image("localhost/multi:native")
    foreign = builder.make_image(
        [builder.make_tar([builder.Entry("foreign", "file", b"not for this node")])],
        "localhost/multi:foreign",
    )
    foreign.config["architecture"] = "s390x" if native.config["architecture"] != "s390x" else "arm"
    for tag, image in (("native", native), ("foreign", foreign)):
        layout = builder.write_oci_layout(image, workdir / tag)
        skopeo_copy(f"oci:{layout}", f"docker://{registry.host}/multi:{tag}")
    descriptors = []
    for tag, image in (("foreign", foreign), ("native", native)):
        _, digest = _head_manifest(registry, "multi", tag)
        size = len(_get_manifest(registry, "multi", digest))
        descriptors.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": image.config["architecture"]},
            }
        )
    inner = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    inner_digest = put_manifest(registry, "multi", "inner", inner)
    outer = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_INDEX,
                "digest": inner_digest,
                "size": len(json.dumps(inner).encode()),
            }
        ],
    }
    put_manifest(registry, "multi", "1", outer)

    info = pulled(registryd, f"{registry.host}/multi:1")
    assert info["architecture"] == native.config["architecture"]
    assert info["manifest_digest"] == descriptors[1]["digest"]
    (layer,) = registryd.ensure(f"{registry.host}/multi:1", "never").lower_dirs
    assert (Path(layer) / "bin/busybox").is_file()

    # An index with nothing for this node says what it has.
    only_foreign = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors[:1]}
    put_manifest(registry, "multi", "foreign-only", only_foreign)
    message = registryd.failure("pull", f"{registry.host}/multi:foreign-only")
    assert "has no image for this node's platform linux/" in message
    assert foreign.config["architecture"] in message


def _get_manifest(registry: Registry, repository: str, reference: str) -> bytes:
    import urllib.request

    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def _head_manifest(registry: Registry, repository: str, reference: str) -> tuple[int, str]:
    import urllib.request

    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, str(response.headers["Docker-Content-Digest"])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything overlayfs sees of a layer: kind, mode, owner, times, content, xattrs."""
    found: dict[str, tuple[Any, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            content: Any = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = info.st_rdev
        xattrs = (
            {}
            if stat.S_ISLNK(info.st_mode)
            else {name: os.getxattr(path, name) for name in os.listxattr(path)}
        )
        found[str(path.relative_to(root))] = (
            info.st_mode,
            info.st_uid,
            info.st_gid,
            # whiteouts are made when unpacked: only files and links carry the tar's time
            int(info.st_mtime)
            if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)
            else None,
            info.st_nlink if stat.S_ISREG(info.st_mode) else None,
            content,
            xattrs,
        )
    return found


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_layers_unpacked_as_they_download_in_parallel_match_an_import(
    registryd: Registryd, registry: Registry, workdir: Path, compression: Compression
) -> None:
    """Six layers, three at a time: the trees are those the store's own unpacking makes."""
    empty = builder.make_tar([builder.Entry("marker", "dir", mode=0o755)])
    image = builder.make_image(
        [
            builder.make_tar(builder.busybox_entries()),
            empty,
            builder.make_tar(
                [
                    builder.Entry("srv", "dir", mode=0o750, uid=33, gid=33),
                    builder.Entry("srv/big", "file", os.urandom(5 << 20), mode=0o600, uid=33),
                    builder.Entry("srv/same", "hardlink", target="srv/big"),
                    builder.Entry("srv/link", "symlink", target="big"),
                    builder.Entry("etc/app.conf", "file", b"a=1\n"),
                ]
            ),
            builder.make_tar(
                [
                    builder.Entry("etc/.wh.app.conf", "file"),
                    builder.Entry("var/cache/.wh..wh..opq", "file"),
                    builder.Entry("var/cache/new", "file", b"n", mode=0o644),
                ]
            ),
            empty,  # the same blob twice in one manifest: fetched once
            builder.make_tar([builder.Entry("top", "file", os.urandom(1 << 20))]),
        ],
        "localhost/layers:1",
    )
    layout = builder.write_oci_layout(image, workdir / "layout", compression)
    name = f"{registry.host}/layers:{compression}"
    skopeo_copy(f"oci:{layout}", f"docker://{name}")

    info = pulled(registryd, name)
    assert len(info["layers"]) == 6 and info["layers"][1] == info["layers"][4]
    streamed = [snapshot(Path(d)) for d in registryd.ensure(name, "never").lower_dirs]
    assert_no_partials(registryd)

    registryd.ok("image", "rm", "--force", name)
    assert registryd.layers() == set()
    imported = registryd.import_(layout, "--name", name)
    assert imported.id == info["id"]
    assert [snapshot(Path(d)) for d in registryd.ensure(name, "never").lower_dirs] == streamed
    bottom_up = registryd.ensure(name, "never").lower_dirs[::-1]
    assert (Path(bottom_up[2]) / "srv/big").stat().st_size == 5 << 20


def test_a_corrupted_layer_among_several_leaves_no_layer_behind(
    registryd: Registryd, registry: Registry, workdir: Path
) -> None:
    layers = [
        builder.make_tar([builder.Entry(f"f{n}", "file", os.urandom(300_000))]) for n in range(4)
    ]
    image = builder.make_image(layers, "localhost/several:1")
    layout = builder.write_oci_layout(image, workdir / "layout")
    skopeo_copy(f"oci:{layout}", f"docker://{registry.host}/several:1")
    manifest = json.loads(
        (layout / "blobs/sha256" / oci_manifest_digest(layout).removeprefix("sha256:")).read_text()
    )
    tampered = manifest["layers"][2]["digest"]
    with fault_proxy(registry.url) as proxy:
        proxy.tamper.add(tampered)
        message = registryd.failure("pull", f"{proxy.host}/several:1")
    assert "does not match its digest" in message and "nothing was kept" in message
    assert registryd.images() == []
    assert registryd.layers() == set()  # none is trusted before every one is in
    assert tampered.removeprefix("sha256:") not in registryd.blobs()
    # Downloads the failure stopped keep what they had, for the next pull to resume.
    assert tampered.removeprefix("sha256:") not in os.listdir(registryd.store / "partial")
    assert os.listdir(registryd.store / "tmp") == []


# ---------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def basic_registry(
    busybox_image: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    server = start_registry(htpasswd_auth(tmp_path_factory.mktemp("htpasswd")))
    try:
        skopeo_copy(
            f"oci:{busybox_image['oci']}",
            f"docker://{server.host}/private/busybox:1",
            f"--dest-creds={USER}:{PASSWORD}",
        )
        yield server
    finally:
        server.stop()


def test_basic_auth_login_logout_and_the_users_own_auth_file(
    registryd: Registryd, basic_registry: Registry, tmp_path: Path
) -> None:
    image = f"{basic_registry.host}/private/busybox:1"
    message = registryd.failure("pull", image)
    assert message == (
        f"error: the registry {basic_registry.host} wants credentials for private/busybox; "
        f"run `zlayerctl login {basic_registry.host}`"
    )
    wrong = ctl_with_stdin(
        registryd, "wrong\n", "login", basic_registry.host, "-u", USER, "--password-stdin"
    )
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f"error: the registry refused the credentials for {basic_registry.host} (user {USER}); "
        f"run `zlayerctl login {basic_registry.host}`"
    )
    assert not (registryd.store / "auth.json").exists()

    done = ctl_with_stdin(
        registryd, PASSWORD + "\n", "login", basic_registry.host, "-u", USER, "--password-stdin"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"logged in to {basic_registry.host} as {USER}"
    auth_file = registryd.store / "auth.json"
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    assert PASSWORD not in auth_file.read_text()  # base64, as Docker keeps it
    assert pulled(registryd, image)["names"] == [image]

    assert registryd.ok("logout", basic_registry.host).strip() == (
        f"logged out of {basic_registry.host}"
    )
    assert "wants credentials" in registryd.failure("pull", image)

    # A Docker config.json the user already has is enough, with no login.
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"auth": token}}})
    )
    ok = registryd.ctl("pull", image, env={"DOCKER_CONFIG": str(docker_config)})
    assert ok.returncode == 0, ok.stderr


def test_bearer_token_flow_against_a_test_token_realm(
    registryd: Registryd, busybox_image: dict[str, Path], tmp_path: Path
) -> None:
    """The registry itself runs token auth, trusting the test's signing certificate."""
    tokens = TokenServer(tmp_path)
    server = start_registry(tokens.registry_auth())
    try:
        skopeo_copy(
            f"oci:{busybox_image['oci']}",
            f"docker://{server.host}/team/busybox:1",
            f"--dest-creds={USER}:{PASSWORD}",
        )
        tokens.requests.clear()
        image = f"{server.host}/team/busybox:1"
        assert "wants credentials" in registryd.failure("pull", image)
        assert tokens.requests[-1] == {
            "scopes": ["repository:team/busybox:pull"],
            "authorized": False,
        }

        registryd.ok("login", server.host, "-u", USER, "-p", PASSWORD)
        tokens.requests.clear()
        info = pulled(registryd, image)
        assert info["names"] == [image]
        # One token for the repository's pull scope, reused for the manifest and every blob.
        assert tokens.requests == [{"scopes": ["repository:team/busybox:pull"], "authorized": True}]
        pulled(registryd, image)
        assert len(tokens.requests) == 1  # still valid: reused by the next pull

        message = registryd.failure("login", server.host, "-u", USER, "-p", "nope")
        assert "the registry refused the credentials for" in message
    finally:
        server.stop()
        tokens.close()


# ---------------------------------------------------------------- faults


def test_a_corrupted_blob_is_rejected_and_nothing_corrupt_is_kept(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path]
) -> None:
    layer = _layer_digest(busybox_image)
    with fault_proxy(registry.url) as proxy:
        proxy.tamper.add(layer)
        message = registryd.failure("pull", f"{proxy.host}/busybox:1")
    assert "does not match its digest" in message and "nothing was kept" in message
    registryd.assert_empty()
    assert_no_partials(registryd)


def test_an_interrupted_download_resumes_with_a_range_request(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path]
) -> None:
    layer = _layer_digest(busybox_image)
    with fault_proxy(registry.url) as proxy:
        proxy.cut_once.add(layer)
        info = pulled(registryd, f"{proxy.host}/busybox:1")
        ranges = [header for digest, header in proxy.ranges if digest == layer]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert info["layers"] == [layer]
    assert registryd.ensure(info["id"], "never").lower_dirs
    assert_no_partials(registryd)


def kill_registryd_during_pull(
    registryd: Registryd, image: str, ready: Callable[[], bool], why: Callable[[], str]
) -> None:
    """Run ``zlayerctl pull image``, kill registryd by its PID once ``ready()``, and
    check the pull ends with one sentence (exit 1, no traceback)."""
    puller = subprocess.Popen(
        [find_executable("zlayerctl"), "pull", image],
        env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert time.monotonic() < deadline, (why(), puller.poll())
            time.sleep(0.02)
        assert registryd.process is not None
        registryd.process.send_signal(signal.SIGKILL)
        registryd.process.communicate(timeout=10)
        registryd.process = None
        _, err = puller.communicate(timeout=30)
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.communicate()
    assert puller.returncode == 1 and "Traceback" not in err, err


def test_registryd_killed_mid_pull_resumes_after_restart(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path]
) -> None:
    layer = _layer_digest(busybox_image)
    partial = registryd.store / "partial" / layer.removeprefix("sha256:")
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True
        image = f"{proxy.host}/busybox:1"
        kill_registryd_during_pull(
            registryd,
            image,
            lambda: partial.exists() and partial.stat().st_size > 200_000,
            lambda: "the download never got going",
        )
        kept = partial.stat().st_size
        assert kept > 200_000

        registryd.start()
        assert registryd.images() == []
        proxy.slow = False
        proxy.ranges.clear()
        info = pulled(registryd, image)
        assert (layer, f"bytes={kept}-") in proxy.ranges
    assert registryd.ensure(info["id"], "never").lower_dirs
    assert_no_partials(registryd)


def test_layers_a_killed_pull_finished_are_not_fetched_again(
    registryd: Registryd, registry: Registry, workdir: Path
) -> None:
    small = builder.make_tar([builder.Entry("small", "file", os.urandom(60_000))])
    large = builder.make_tar([builder.Entry("large", "file", os.urandom(1_500_000))])
    image = builder.make_image([small, large], "localhost/two:1")
    layout = builder.write_oci_layout(image, workdir / "layout")
    skopeo_copy(f"oci:{layout}", f"docker://{registry.host}/two:1")
    manifest = json.loads(
        (layout / "blobs/sha256" / oci_manifest_digest(layout).removeprefix("sha256:")).read_text()
    )
    done, going = (layer["digest"].removeprefix("sha256:") for layer in manifest["layers"])
    partial_dir = registryd.store / "partial"
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True
        image_name = f"{proxy.host}/two:1"
        kill_registryd_during_pull(
            registryd,
            image_name,
            lambda: (
                done in registryd.blobs()
                and (partial_dir / going).exists()
                and (partial_dir / going).stat().st_size > 200_000
            ),
            lambda: (
                f"the downloads never got going: {registryd.blobs()}, {os.listdir(partial_dir)}"
            ),
        )
        registryd.start()  # its clean-up drops the blobs no image references
        # the whole finished download is still there
        assert (partial_dir / done).stat().st_size == manifest["layers"][0]["size"]
        proxy.slow = False
        proxy.ranges.clear()
        info = pulled(registryd, image_name)
        fetched = {digest.removeprefix("sha256:") for digest, _ in proxy.ranges}
    assert done not in fetched and going in fetched
    assert [Path(d).name for d in registryd.ensure(info["id"], "never").lower_dirs][::-1] == [
        diff.removeprefix("sha256:") for diff in image.config["rootfs"]["diff_ids"]
    ]
    assert_no_partials(registryd)


def _traced_writes_and_syncs(trace: str) -> list[tuple[str, str]]:
    """strace -f -y output as (event, path) in order: ("write", file), ("sync start", what
    it syncs: "" for every file system, a directory for the one holding it), ("sync end", ""),
    ("fsync", file), ("link", new name), ("rename", (old, new) joined)."""
    events: list[tuple[str, str]] = []
    for line in trace.splitlines():
        call = line.split(" ", 1)[1].strip() if " " in line else line
        if call.startswith(("write(", "pwrite64(")):
            events.append(("write", call.split("<", 1)[1].split(">", 1)[0]))
        elif call.startswith(("sync(", "syncfs(")):
            synced = call.split("<", 1)[1].split(">", 1)[0] if call.startswith("syncfs(") else ""
            events.append(("sync start", synced))
            if "<unfinished" not in call:
                events.append(("sync end", ""))
        elif call.startswith(("<... sync resumed>", "<... syncfs resumed>")):
            events.append(("sync end", ""))
        elif call.startswith(("fsync(", "fdatasync(")):
            events.append(("fsync", call.split("<", 1)[1].split(">", 1)[0]))
        elif call.startswith(("link(", "linkat(")):
            events.append(("link", call.split('"')[3]))
        elif call.startswith(("rename(", "renameat(", "renameat2(")):
            names = call.split('"')
            events.append(("rename", names[1] + " " + names[3]))
    return events


def test_a_pulled_blob_and_its_tree_are_on_disk_before_they_count_as_stored(
    registryd: Registryd, registry: Registry, workdir: Path
) -> None:
    """What a pull writes is synced before the blob is linked into blobs/ and before its
    tree is renamed into layers/; one sync of the store serves the blobs that end while it
    runs, instead of one flush per downloaded file."""
    need_tools("strace")
    layers = [
        builder.make_tar([builder.Entry(f"f{n}", "file", os.urandom(300_000))]) for n in range(6)
    ]
    layout = builder.write_oci_layout(builder.make_image(layers, "localhost/six:1"), workdir / "l")
    name = f"{registry.host}/six:1"
    skopeo_copy(f"oci:{layout}", f"docker://{name}")
    assert registryd.process is not None
    trace = workdir / "trace"
    syscalls = "write,pwrite64,fsync,fdatasync,sync,syncfs,link,linkat,rename,renameat,renameat2"
    pid = str(registryd.process.pid)
    tracer = subprocess.Popen(
        ["strace", "-f", "-y", "-e", f"trace={syscalls}", "-o", str(trace), "-p", pid],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "attached" not in (tracer.stderr.readline() if tracer.stderr else ""):
            assert time.monotonic() < deadline and tracer.poll() is None, "strace did not attach"
        info = pulled(registryd, name)
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches; registryd goes on
        tracer.communicate(timeout=30)
    assert len(info["layers"]) == 6
    events = _traced_writes_and_syncs(trace.read_text())
    store = str(registryd.store)

    def synced_before(index: int, path: str) -> bool:
        """Whether a sync started after the last write to ``path`` (a file, or a directory
        ending in /: what is under it) and ended before event ``index``."""
        writes = enumerate(events[:index])
        last = max(i for i, (e, p) in writes if e == "write" and p.startswith(path))
        started = [i for i, (e, _) in enumerate(events[:index]) if e == "sync start" and i > last]
        return bool(started) and any(e == "sync end" for e, _ in events[started[0] : index])

    links = [(i, p) for i, (e, p) in enumerate(events) if e == "link" and "/blobs/" in p]
    assert len(links) == 6, events
    # the store's own file system, not every one on the machine
    assert {p for e, p in events if e == "sync start"} == {store}, events
    for index, blob in links:
        partial = f"{store}/partial/{Path(blob).name}"
        assert synced_before(index, partial), blob
    renames = [
        (i, p.split()[0]) for i, (e, p) in enumerate(events) if e == "rename" and "/layers/" in p
    ]
    assert len(renames) == 6, events
    for index, work in renames:
        assert synced_before(index, work + "/"), work
    # no flush of each downloaded file of its own
    flushed = [p for e, p in events if e == "fsync" and ("/partial/" in p or "/unpack-" in p)]
    assert flushed == []
    assert_no_partials(registryd)


def test_clear_sentences_for_a_wrong_tag_and_an_unreachable_registry(
    registryd: Registryd, registry: Registry
) -> None:
    assert registryd.failure("pull", f"{registry.host}/busybox:v9") == (
        "error: the registry has no tag v9 for busybox"
    )
    assert registryd.failure("pull", f"{registry.host}/nothing/here:1") == (
        f"error: the registry {registry.host} has no repository nothing/here"
    )
    closed = f"127.0.0.1:{free_port()}"
    assert registryd.failure("pull", f"{closed}/busybox:1") == (
        f"error: cannot reach registry {closed}: connection refused"
    )
    assert "lowercase" in registryd.failure("pull", "Busybox")
    registryd.assert_empty()


def test_a_registry_that_dies_mid_pull_is_one_sentence(
    registryd: Registryd, registry: Registry
) -> None:
    """The proxy is the registry registryd talks to: it goes away mid-blob."""
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True
        puller = subprocess.Popen(
            [find_executable("zlayerctl"), "pull", f"{proxy.host}/busybox:1"],
            env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            partial_dir = registryd.store / "partial"
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size > 100_000 for p in partial_dir.iterdir()):
                assert time.monotonic() < deadline, "the download never got going"
                time.sleep(0.02)
            proxy.die()
            _, err = puller.communicate(timeout=60)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
    assert puller.returncode == 1
    assert err.strip() == f"error: cannot reach registry {proxy.host}: connection refused"
    assert registryd.images() == [] and registryd.blobs() == set()


def test_mirrors_are_tried_in_order_before_the_registry(
    registryd: Registryd, registry: Registry
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = registryd.paths.daemon_config("registryd")
    config.write_text(
        config.read_text() + f'[mirrors]\n"mirror-only.invalid" = ["{dead}", "{registry.url}"]\n'
    )
    registryd.stop()
    registryd.start()
    info = pulled(registryd, "mirror-only.invalid/busybox:1")
    assert info["names"] == ["mirror-only.invalid/busybox:1"]


# ---------------------------------------------------------------- EnsureImage and policies


def test_ensure_image_pulls_as_the_pull_policy_says(
    registryd: Registryd, registry: Registry
) -> None:
    image = f"{registry.host}/busybox:1"
    with pytest.raises(NotFoundError, match="pull policy is never"):
        registryd.ensure(image, "never")
    rootfs = registryd.ensure(image, "if_not_present")  # not here: pulled
    assert rootfs.image.names == [image]
    assert (Path(rootfs.lower_dirs[0]) / "bin/busybox").is_file()
    assert registryd.ensure(image, "never").image.id == rootfs.image.id
    assert registryd.ensure(image, "always").image.id == rootfs.image.id

    # newer keeps the local copy when the registry cannot be reached; always does not.
    with fault_proxy(registry.url) as proxy:
        through_proxy = f"{proxy.host}/busybox:1"
        registryd.ensure(through_proxy, "always")
    assert registryd.ensure(through_proxy, "newer").image.id == rootfs.image.id
    with pytest.raises(UnavailableError, match=f"cannot reach registry {proxy.host}"):
        registryd.ensure(through_proxy, "always")
    assert registryd.ensure(through_proxy, "if_not_present").image.id == rootfs.image.id


def _layer_digest(busybox_image: dict[str, Path]) -> str:
    layout = busybox_image["oci"]
    manifest_hex = oci_manifest_digest(layout).removeprefix("sha256:")
    manifest = json.loads((layout / "blobs/sha256" / manifest_hex).read_text())
    return str(manifest["layers"][0]["digest"])
