"""Paths registryd cannot see: what a user of the packaged units gets.

Under systemd registryd has a private /tmp and no /home (PrivateTmp=,
ProtectHome=), so a build context, an archive or a WASM binary there is out
of its reach by path. Here registryd runs in a mount namespace of its own
(``unshare --mount``) with an empty tmpfs over the test's directory: the same
kernel mechanism the unit's sandbox uses. zlayerctl must notice, send the
files (ctl/transfer.py), speak of the user's own paths in every message, and
registryd must keep nothing it was sent once the call or job has ended.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.busdaemon import PrivateBus
from shared.paths import Paths
from shared.wire import decode
from shared.wire.registry import WasmArtifact
from tests.integration.test_daemon import NotifyListener, stop
from tests.integration.test_registryd import Registryd
from tests.registry_fixture import start_registry
from tests.unit.test_wasm import HELLO_MODULE_WAT, compile_wat

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace of registryd's own needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing"),
]

# Run by sh inside the new namespace: hide $1 behind an empty tmpfs, then become registryd.
HIDE_THEN_EXEC = 'mount -t tmpfs -o size=1m,mode=0755 zlhidden "$1" && shift && exec "$@"'


class HiddenRegistryd(Registryd):
    """A registryd for which ``hidden`` is an empty directory."""

    def __init__(self, paths: Paths, bus: PrivateBus, notify: NotifyListener, hidden: Path):
        super().__init__(paths, bus, notify)
        # unshare and sh exec in place: the PID we hold is registryd's own.
        self.wrapper = (
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", HIDE_THEN_EXEC, "sh", str(hidden),
        )  # fmt: skip

    def received(self) -> list[str]:
        return os.listdir(self.store / "received")


@pytest.fixture
def hidden() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zlhidden-") as name:
        yield Path(name)


@pytest.fixture
def daemon(
    zlayer_prefix: Paths, private_bus: PrivateBus, hidden: Path
) -> Iterator[HiddenRegistryd]:
    listener = NotifyListener(zlayer_prefix.prefix / "notify.sock")
    registryd = HiddenRegistryd(zlayer_prefix, private_bus, listener, hidden)
    try:
        registryd.start()
        yield registryd
        registryd.stop()
    finally:
        if registryd.process is not None:
            stop(registryd.process)
        listener.close()


def test_registryd_really_cannot_see_the_directory(
    daemon: HiddenRegistryd, hidden: Path, busybox_image: dict[str, Path]
) -> None:
    secret = hidden / "file"
    secret.write_text("x")
    here = os.stat(secret)
    assert daemon.call("path_visible", str(secret), here.st_dev, here.st_ino) is False
    archive = busybox_image["oci-archive"]
    there = os.stat(archive)
    assert daemon.call("path_visible", str(archive), there.st_dev, there.st_ino) is True


def test_import_and_wasm_push_from_a_hidden_directory(
    daemon: HiddenRegistryd, hidden: Path, busybox_image: dict[str, Path]
) -> None:
    archive = hidden / "busybox.tar"
    shutil.copy(busybox_image["oci-archive"], archive)
    layout = hidden / "layout"
    shutil.copytree(busybox_image["oci"], layout)

    info = daemon.import_(archive, "--name", "hidden/busybox:1")
    assert "docker.io/hidden/busybox:1" in info.names
    again = daemon.import_(layout, "--name", "hidden/busybox:2")
    assert again.id == info.id
    # A symbolic link to the layout sends what it names (registryd refuses a link itself).
    link = hidden / "current"
    link.symlink_to(layout)
    linked = daemon.import_(link, "--name", "hidden/busybox:3")
    assert linked.id == info.id
    assert daemon.received() == []

    # A failure names the user's file, not registryd's copy of it.
    junk = hidden / "junk.tar"
    junk.write_bytes(b"not an archive at all" * 100)
    message = daemon.failure("image", "import", str(junk))
    assert str(junk) in message and "received" not in message, message
    assert daemon.received() == []

    module = hidden / "hello.wasm"
    module.write_bytes(compile_wat(HELLO_MODULE_WAT))
    server = start_registry()
    try:
        reference = f"{server.host}/wasm/hello:1"
        out = daemon.ok("wasm", "push", str(module), reference, "--format", "json")
        assert decode(out, WasmArtifact).location == reference
    finally:
        server.stop()
    assert daemon.received() == []


@pytest.mark.skipif(shutil.which("buildah") is None, reason="apt-get install buildah")
def test_build_from_a_hidden_context(
    daemon: HiddenRegistryd, hidden: Path, busybox_image: dict[str, Path]
) -> None:
    project = hidden / "project"
    project.mkdir()
    (project / "hello.txt").write_text("hello from a hidden context\n")
    elsewhere = hidden / "files"
    elsewhere.mkdir()
    dockerfile = elsewhere / "Dockerfile.hidden"
    dockerfile.write_text(
        textwrap.dedent(
            f"""
            FROM oci-archive:{busybox_image["oci-archive"]}
            COPY hello.txt /hello.txt
            """
        )
    )
    result = daemon.ctl("build", str(project), "-f", str(dockerfile), "-t", "hidden/app:1")
    assert result.returncode == 0, result.stderr
    # The streamed log speaks of the user's directory.
    assert f"in {project}" in result.stdout and "received" not in result.stdout, result.stdout
    image = daemon.ensure("hidden/app:1")
    found = [Path(layer) / "hello.txt" for layer in image.lower_dirs]
    assert any(p.is_file() and p.read_text() == "hello from a hidden context\n" for p in found)
    assert daemon.received() == []

    # No Dockerfile: the sentence names the context the user gave.
    empty = hidden / "empty"
    empty.mkdir()
    message = daemon.failure("build", str(empty), "-t", "hidden/none:1")
    assert message == (
        f"error: {empty} has no ZImagefile or Dockerfile; name one with -f or -z, "
        "or use --runtime or --runtime-auto"
    )
    # A context holding what registryd will not take (a named pipe) is refused, whole,
    # and zlayerctl stops sending the megabytes after it at once.
    os.mkfifo(project / "pipe")
    (project / "zz-big.bin").write_bytes(os.urandom(8 << 20))
    message = daemon.failure("build", str(project), "-f", str(dockerfile), "-t", "hidden/app:2")
    assert message == (
        "error: project/pipe is a device or a named pipe; move it out of the directory and "
        "try again"
    )
    assert daemon.received() == []
