"""zlayer-registryd on a real private bus: imports, the store on disk, removal, EnsureImage.

Driven through the real ``zlayerctl`` (as a user would) and through the bus
(for EnsureImage, which only daemons call). Every check of "no trace" looks
at the store directory itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.supervisor import find_executable
from shared import busybox_image as builder
from shared.bus import (
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    open_bus,
)
from shared.busdaemon import PrivateBus
from shared.busybox_image import Entry, make_image, make_tar
from shared.clients import RegistryClient
from shared.paths import Paths
from shared.wire import decode
from shared.wire.daemon import DaemonStatus
from shared.wire.registry import ImageInfo, ImageRootfs
from tests.integration.test_daemon import NotifyListener, start, stop

BUSYBOX = "docker.io/zlayer/busybox:latest"


class Registryd:
    """One zlayer-registryd, zlayerctl pointed at it, and a look at its store."""

    def __init__(self, paths: Paths, bus: PrivateBus, notify: NotifyListener) -> None:
        self.paths = paths
        self.bus = bus
        self.notify = notify
        self.store = paths.daemon_state("registryd")
        self.process: subprocess.Popen[str] | None = None
        self.wrapper: tuple[str, ...] = ()  # what the daemon runs under, if anything
        self.env: dict[str, str] = {}  # added to the daemon's environment

    def start(self) -> None:
        self.notify.messages.clear()
        self.process = start("registryd", self.bus, self.notify, wrapper=self.wrapper, **self.env)
        self.notify.wait_for("READY=1")

    def stop(self) -> None:
        if self.process is not None:
            code, err = stop(self.process)
            self.process = None
            assert code == 0, err
            assert "Traceback" not in err, err

    def ctl(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        environ = dict(os.environ, ZLAYER_BUS_ADDRESS=self.bus.address, **(env or {}))
        result = subprocess.run(
            [find_executable("zlayerctl"), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=environ,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *args: str) -> str:
        result = self.ctl(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def failure(self, *args: str) -> str:
        """The one sentence a failing command prints."""
        result = self.ctl(*args)
        assert result.returncode != 0, result.stdout
        message = result.stderr.strip()
        assert message.startswith("error: ") and "\n" not in message, message
        return message

    def import_(self, path: Path, *extra: str) -> ImageInfo:
        return decode(self.ok("image", "import", str(path), "--format", "json", *extra), ImageInfo)

    def images(self) -> list[dict[str, Any]]:
        images: list[dict[str, Any]] = json.loads(self.ok("image", "ls", "--format", "json"))
        return images

    def call(self, method: str, *args: Any) -> Any:
        async def run() -> Any:
            bus = open_bus(self.bus.address)
            try:
                return await getattr(RegistryClient(bus)._proxy, method)(*args)
            finally:
                bus.close()

        return asyncio.run(run())

    def ensure(self, reference: str, policy: str = "if_not_present") -> ImageRootfs:
        return decode(self.call("ensure_image", reference, policy), ImageRootfs)

    def blobs(self) -> set[str]:
        return set(os.listdir(self.store / "blobs" / "sha256"))

    def layers(self) -> set[str]:
        return set(os.listdir(self.store / "layers"))

    def assert_empty(self) -> None:
        assert self.blobs() == set()
        assert self.layers() == set()
        assert os.listdir(self.store / "tmp") == []
        assert self.images() == []


@pytest.fixture
def registryd(zlayer_prefix: Paths, private_bus: PrivateBus) -> Iterator[Registryd]:
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    daemon = Registryd(zlayer_prefix, private_bus, listener)
    try:
        daemon.start()
        yield daemon
        daemon.stop()
    finally:
        if daemon.process is not None:
            stop(daemon.process)
        listener.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zlreg-") as name:
        yield Path(name)


def busybox_layer() -> bytes:
    return make_tar(builder.busybox_entries())


def app_image() -> builder.Image:
    """busybox's layer plus one of its own: shares a layer with the busybox image."""
    extra = make_tar(
        [Entry("app", "dir", mode=0o755), Entry("app/hello", "file", b"hello\n", mode=0o644)]
    )
    return make_image([busybox_layer(), extra], "localhost/app:1", cmd=["cat", "/app/hello"])


# ---------------------------------------------------------------- import


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_imports_each_format(
    registryd: Registryd, busybox_image: dict[str, Path], kind: str
) -> None:
    info = registryd.import_(busybox_image[kind])
    assert info.names == [BUSYBOX]
    assert info.id.startswith("sha256:") and len(info.layers) == 1
    assert info.os == "linux" and info.architecture and info.size > 500_000
    assert [image["id"] for image in registryd.images()] == [info.id]
    # manifest, config, layer; one unpacked layer
    assert len(registryd.blobs()) == 3 and len(registryd.layers()) == 1
    assert stat.S_IMODE(os.stat(registryd.store).st_mode) == 0o700

    detail = json.loads(registryd.ok("image", "inspect", "zlayer/busybox", "--format", "json"))
    assert detail["config"]["cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in detail["config"]["env"])

    rootfs = registryd.ensure("zlayer/busybox")
    (layer,) = rootfs.lower_dirs
    assert os.access(Path(layer) / "bin/busybox", os.X_OK)
    assert os.readlink(Path(layer) / "bin/sh") == "busybox"
    assert "root:x:0:0" in (Path(layer) / "etc/passwd").read_text()


def test_newer_docker_save_and_zstd_layers(registryd: Registryd, workdir: Path) -> None:
    image = builder.busybox_image("localhost/bb:blobs")
    docker = registryd.import_(builder.write_docker_archive(image, workdir / "d.tar", "blobs"))
    assert docker.names == ["localhost/bb:blobs"]
    zstd = registryd.import_(
        builder.write_oci_layout(image, workdir / "zstd", compression="zstd"), "--name", "bb:zstd"
    )
    # Same config, so the same image: the second import only adds a name.
    assert zstd.id == docker.id
    assert zstd.names == ["localhost/bb:blobs", "docker.io/library/bb:zstd"]


def test_the_same_image_twice_stores_its_blobs_once(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    first = registryd.import_(busybox_image["oci"])
    blobs, layers = registryd.blobs(), registryd.layers()
    again = registryd.import_(busybox_image["oci-archive"], "--name", "localhost/bb:1")
    docker = registryd.import_(busybox_image["docker-archive"])
    assert first.id == again.id == docker.id
    assert registryd.blobs() == blobs and registryd.layers() == layers
    assert docker.names == [BUSYBOX, "localhost/bb:1"]
    table = registryd.ok("image", "ls")
    assert BUSYBOX in table and "localhost/bb:1" in table and first.id[7:19] in table


def test_parallel_imports_of_images_sharing_a_layer(
    registryd: Registryd, busybox_image: dict[str, Path], workdir: Path
) -> None:
    app = builder.write_oci_archive(app_image(), workdir / "app.tar")
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(key: str, path: Path) -> None:
        results[key] = registryd.ctl("image", "import", str(path))

    threads = [
        threading.Thread(target=run, args=("busybox", busybox_image["docker-archive"])),
        threading.Thread(target=run, args=("app", app)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values()), results
    assert len(registryd.images()) == 2
    assert len(registryd.layers()) == 2  # the shared layer is unpacked once
    assert os.listdir(registryd.store / "tmp") == []


# ---------------------------------------------------------------- ls, inspect, rm


def test_inspect_by_name_id_and_prefix_then_remove(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    info = registryd.import_(busybox_image["oci"], "--name", "localhost/x:1")
    by_digest = f"zlayer/busybox@{info.manifest_digest}"
    for reference in (
        "zlayer/busybox",
        BUSYBOX,
        info.id,
        info.id[7:19],
        "localhost/x:1",
        by_digest,
    ):
        detail = json.loads(registryd.ok("image", "inspect", reference, "--format", "json"))
        assert detail["image"]["id"] == info.id
    text = registryd.ok("image", "inspect", "zlayer/busybox")
    assert info.id in text and '["sh"]' in text and info.layers[0] in text
    assert registryd.ok("image", "ls", "-q").split() == [info.id[7:19]]

    message = registryd.failure("image", "rm", info.id[7:19])
    assert "has 2 names" in message and "--force" in message

    assert registryd.ok("image", "rm", "localhost/x:1").strip() == "untagged localhost/x:1"
    assert len(registryd.blobs()) == 3

    out = registryd.ok("image", "rm", "zlayer/busybox").splitlines()
    assert out[0] == f"untagged {BUSYBOX}"
    assert {line.split()[1] for line in out[1:]} == {
        info.id,
        info.manifest_digest,
        *info.layers,
    }
    registryd.assert_empty()


def test_force_removes_every_name_of_an_id(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    info = registryd.import_(busybox_image["oci"], "--name", "localhost/x:1")
    removed = registryd.call("remove_image", info.id, True)
    assert removed[:2] == [BUSYBOX, "localhost/x:1"]
    registryd.assert_empty()


def test_removing_an_image_keeps_the_layer_another_uses(
    registryd: Registryd, busybox_image: dict[str, Path], workdir: Path
) -> None:
    busybox = registryd.import_(busybox_image["oci"])
    app = registryd.import_(builder.write_oci_archive(app_image(), workdir / "app.tar"))
    assert busybox.layers[0] == app.layers[0]

    removed = registryd.call("remove_image", "zlayer/busybox", False)
    assert busybox.layers[0] not in removed and busybox.id in removed
    rootfs = registryd.ensure("localhost/app:1")
    top, base = rootfs.lower_dirs
    assert (Path(top) / "app/hello").read_text() == "hello\n"
    assert (Path(base) / "bin/busybox").is_file()
    assert rootfs.config.cmd == ["cat", "/app/hello"]

    registryd.ok("image", "rm", "localhost/app:1")
    registryd.assert_empty()


# ---------------------------------------------------------------- corrupt archives


def _corrupt_oci(busybox_image: dict[str, Path], workdir: Path) -> Path:
    layout = workdir / "corrupt-oci"
    shutil.copytree(busybox_image["oci"], layout)
    index = json.loads((layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs/sha256" / manifest_hex).read_text())
    layer = layout / "blobs/sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    return layout


def _corrupt_docker(image: builder.Image, path: Path) -> Path:
    """A docker save tar whose last layer.tar is a valid tar, but not the one the config names."""
    files = builder.docker_archive_files(image)
    last = max(
        (name for name in files if name.endswith("layer.tar")),
        key=lambda name: json.loads(files["manifest.json"])[0]["Layers"].index(name),
    )
    files[last] = make_tar([Entry("evil", "file", b"not what the config says")])
    path.write_bytes(builder._tar_of(files))
    return path


def test_a_corrupt_archive_is_refused_and_leaves_no_trace(
    registryd: Registryd, busybox_image: dict[str, Path], workdir: Path
) -> None:
    message = registryd.failure("image", "import", str(_corrupt_oci(busybox_image, workdir)))
    assert "corrupt" in message
    registryd.assert_empty()

    corrupt_busybox = _corrupt_docker(builder.busybox_image(), workdir / "bb.tar")
    message = registryd.failure("image", "import", str(corrupt_busybox))
    assert "corrupt" in message
    registryd.assert_empty()

    # A corrupt image that shares a good layer with a stored image is refused
    # without taking that layer with it.
    good = registryd.import_(busybox_image["docker-archive"])
    before = registryd.blobs(), registryd.layers()
    corrupt_app = _corrupt_docker(app_image(), workdir / "app.tar")
    assert "corrupt" in registryd.failure("image", "import", str(corrupt_app))
    assert (registryd.blobs(), registryd.layers()) == before
    assert [image["id"] for image in registryd.images()] == [good.id]
    assert registryd.ensure(good.id).lower_dirs


def test_not_an_image_is_one_sentence(registryd: Registryd, workdir: Path) -> None:
    text_file = workdir / "notes.txt"
    text_file.write_text("hello\n")
    assert "is not an image" in registryd.failure("image", "import", str(text_file))
    empty = workdir / "empty"
    empty.mkdir()
    assert "oci-layout" in registryd.failure("image", "import", str(empty))
    not_image = workdir / "plain.tar"
    not_image.write_bytes(make_tar([Entry("hello", "file", b"x")]))
    assert "manifest.json" in registryd.failure("image", "import", str(not_image))
    registryd.assert_empty()


# ---------------------------------------------------------------- restarts


def test_a_restarted_registryd_keeps_its_images_and_drops_leftovers(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    info = registryd.import_(busybox_image["oci"])
    registryd.stop()
    # What a daemon killed mid-import leaves: work files and blobs no image names.
    (registryd.store / "tmp" / "unpack-half").mkdir()
    (registryd.store / "blobs/sha256" / ("0" * 64)).write_bytes(b"orphan")
    (registryd.store / "layers" / ("1" * 64)).mkdir()
    registryd.start()
    assert [image["id"] for image in registryd.images()] == [info.id]
    assert len(registryd.blobs()) == 3 and len(registryd.layers()) == 1
    assert os.listdir(registryd.store / "tmp") == []
    assert registryd.ensure("zlayer/busybox").lower_dirs


# ---------------------------------------------------------------- EnsureImage


def _whiteout_image() -> builder.Image:
    base = make_tar(
        [
            *builder.busybox_entries(),
            Entry("etc/motd", "file", b"old motd\n"),
            Entry("var/cache", "dir", mode=0o755),
            Entry("var/cache/old", "file", b"old"),
        ]
    )
    top = make_tar(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/.wh.motd", "file"),
            Entry("var", "dir", mode=0o755),
            Entry("var/cache", "dir", mode=0o755),
            Entry("var/cache/.wh..wh..opq", "file"),
            Entry("var/cache/new", "file", b"new"),
        ]
    )
    return make_image([base, top], "localhost/whiteouts:1")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")
def test_ensure_image_lower_dirs_make_the_image_under_overlayfs(
    registryd: Registryd, workdir: Path
) -> None:
    registryd.import_(builder.write_oci_layout(_whiteout_image(), workdir / "wh", "gzip"))
    rootfs = registryd.ensure("localhost/whiteouts:1", "never")
    assert len(rootfs.lower_dirs) == 2
    assert rootfs.image.names == ["localhost/whiteouts:1"]
    mountpoint = workdir / "merged"
    mountpoint.mkdir()
    lower = ":".join(rootfs.lower_dirs)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(mountpoint)],
        check=True,
    )
    try:
        assert os.access(mountpoint / "bin/busybox", os.X_OK)
        assert not (mountpoint / "etc/motd").exists()
        assert (mountpoint / "etc/passwd").is_file()
        assert sorted(os.listdir(mountpoint / "var/cache")) == ["new"]
        run = subprocess.run(
            ["chroot", str(mountpoint), "/bin/sh", "-c", "echo $((6 * 7)); ls /var/cache"],
            capture_output=True,
            text=True,
        )
        assert run.stdout.split() == ["42", "new"], run.stderr
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_ensure_image_of_a_missing_image_says_how_to_get_it(registryd: Registryd) -> None:
    # .invalid never resolves (RFC 2606), so this holds with or without a network.
    with pytest.raises(UnavailableError) as caught:
        registryd.ensure("registry.invalid/nginx:1")
    assert str(caught.value.args[0]) == (
        "cannot pull registry.invalid/nginx:1: cannot reach registry registry.invalid:443: its "
        "name does not resolve (check the name, DNS and the network); it is not on this node "
        "either: import it with `zlayerctl image import PATH`, or fix the registry and deploy "
        "again"
    )
    with pytest.raises(NotFoundError) as never:
        registryd.ensure("registry.invalid/nginx:1", "never")
    assert "its pull policy is never" in str(never.value.args[0])
    with pytest.raises(InvalidArgumentError, match="pull policy"):
        registryd.ensure("nginx:1", "sometimes")
    with pytest.raises(InvalidArgumentError, match="lowercase"):
        registryd.ensure("NGINX")


# ---------------------------------------------------------------- CLI errors


def test_cli_errors_are_one_sentence(registryd: Registryd, busybox_image: dict[str, Path]) -> None:
    assert registryd.failure("image", "inspect", "nothing:1") == (
        "error: image docker.io/library/nothing:1 is not on this node; "
        "`zlayerctl image ls` lists the images here"
    )
    assert "is not on this node" in registryd.failure("image", "rm", "nothing")
    assert "lowercase" in registryd.failure("image", "inspect", "Nothing")
    assert "lowercase" in registryd.failure(
        "image", "import", str(busybox_image["oci"]), "--name", "Bad/Name"
    )
    missing = registryd.ctl("image", "import", "/nonexistent/image.tar")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    registryd.assert_empty()


def test_cli_without_daemons_says_so(zlayer_prefix: Paths) -> None:
    environ = dict(os.environ, ZLAYER_BUS_ADDRESS=f"unix:path={zlayer_prefix.prefix}/no.sock")
    result = subprocess.run(
        [find_executable("zlayerctl"), "image", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert result.returncode == 1
    assert "daemons are not running" in result.stderr and "Traceback" not in result.stderr


def test_a_registryd_killed_mid_import_leaves_nothing_half_done(
    registryd: Registryd, workdir: Path
) -> None:
    big = make_tar(
        [Entry("data", "dir", mode=0o755)]
        + [Entry(f"data/{i}", "file", os.urandom(1 << 20)) for i in range(96)]
    )
    archive = builder.write_docker_archive(
        make_image([busybox_layer(), big], "localhost/big:1"), workdir / "big.tar"
    )
    assert registryd.process is not None
    environ = dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address)
    importer = subprocess.Popen(
        [find_executable("zlayerctl"), "image", "import", str(archive)],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tmp = registryd.store / "tmp"
        deadline = time.monotonic() + 30
        while not any(name.startswith("unpack-") for name in os.listdir(tmp)):
            assert time.monotonic() < deadline, "the import never started unpacking"
            time.sleep(0.005)
        registryd.process.kill()
        registryd.process.communicate(timeout=10)
        registryd.process = None
        _, err = importer.communicate(timeout=30)
        assert importer.returncode == 1 and "Traceback" not in err
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.communicate()
    registryd.start()
    registryd.assert_empty()


def test_metrics_count_images_and_bytes(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    registryd.import_(busybox_image["oci"])
    status = DaemonStatus.from_dbus(registryd.call("status"))
    assert status.detail == "1 image"
    with urllib.request.urlopen(status.metrics_url, timeout=5) as response:
        body = response.read().decode()
    assert "zlayer_registry_images 1.0" in body
    assert "zlayer_registry_unpacked_layers 1.0" in body
    assert 'zlayer_registry_imports_total{result="ok"} 1.0' in body
    size = next(line for line in body.splitlines() if line.startswith("zlayer_registry_blob_bytes"))
    assert float(size.split()[1]) > 500_000
