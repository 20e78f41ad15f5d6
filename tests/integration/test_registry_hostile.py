"""zlayer-registryd against registries that send too much or ask for credentials where they
must not go, through zlayerctl, with real docker-registry servers: a layer declared larger
than max_layer_size, a layer of no declared size that does not stop, a store without the
space a layer declares, and token realms over plain HTTP (on another host than the
registry's, or for a registry that itself uses HTTPS)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemons.registryd.unpack import human_size
from shared.busdaemon import PrivateBus
from shared.paths import Paths
from tests.integration.test_daemon import NotifyListener, stop
from tests.integration.test_registryd import Registryd
from tests.registry_fixture import (
    PASSWORD,
    USER,
    Registry,
    TokenServer,
    fault_proxy,
    manifest_of,
    put_manifest,
    skopeo_copy,
    start_registry,
    tls_files,
)


@contextlib.contextmanager
def registryd_with(
    paths: Paths, bus: PrivateBus, settings: str = "", env: dict[str, str] | None = None
) -> Iterator[Registryd]:
    """A registryd with these registryd.toml lines added, stopped by PID at the end."""
    config = paths.daemon_config("registryd")
    config.write_text(config.read_text() + settings)
    listener = NotifyListener(paths.prefix / "notify.sock")
    daemon = Registryd(paths, bus, listener)
    daemon.env = env or {}
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.process is not None:
            stop(daemon.process)
        listener.close()


def stop_for_log(daemon: Registryd) -> str:
    """Stop registryd and give what it logged."""
    assert daemon.process is not None
    code, err = stop(daemon.process)
    daemon.process = None
    assert code == 0 and "Traceback" not in err, err
    return err


def layer_of(registry: Registry, repository: str, tag: str) -> dict[str, Any]:
    body, _ = manifest_of(registry, repository, tag)
    layer: dict[str, Any] = json.loads(body)["layers"][0]
    return layer


def assert_nothing_kept(daemon: Registryd) -> None:
    assert os.listdir(daemon.store / "partial") == []
    assert os.listdir(daemon.store / "tmp") == []
    assert daemon.layers() == set() and daemon.images() == []


# ---------------------------------------------------------------- sizes


def test_a_layer_declared_larger_than_max_layer_size_is_refused_before_it_downloads(
    zlayer_prefix: Paths, private_bus: PrivateBus, registry: Registry
) -> None:
    layer = layer_of(registry, "busybox", "1")
    with (
        registryd_with(zlayer_prefix, private_bus, "max_layer_size = 100000\n") as daemon,
        fault_proxy(registry.url) as proxy,
    ):
        message = daemon.failure("pull", f"{proxy.host}/busybox:1")
        fetched = [digest for digest, _ in proxy.ranges]
        assert message == (
            f"error: layer 1 ({layer['digest'][7:19]}) of {proxy.host}/busybox:1 is "
            f"{human_size(layer['size'])}, more than max_layer_size (97.7 KiB); raise "
            "max_layer_size in registryd.toml if the image is trusted"
        )
        assert layer["digest"] not in fetched  # refused before a byte of it came
        assert_nothing_kept(daemon)


def test_a_layer_of_no_declared_size_stops_at_max_layer_size(
    zlayer_prefix: Paths, private_bus: PrivateBus, registry: Registry
) -> None:
    body, _ = manifest_of(registry, "busybox", "1")
    manifest = json.loads(body)
    digest = manifest["layers"][0]["digest"]
    del manifest["layers"][0]["size"]  # the registry stores it as sent
    put_manifest(registry, "busybox", "nosize", manifest)
    assert "size" not in layer_of(registry, "busybox", "nosize")
    with registryd_with(zlayer_prefix, private_bus, "max_layer_size = 200000\n") as daemon:
        message = daemon.failure("pull", f"{registry.host}/busybox:nosize")
        assert message == (
            f"error: the registry {registry.host} sent more than max_layer_size (195.3 KiB) "
            f"of blob {digest}, which declares no size; raise max_layer_size in registryd.toml "
            "if the image is trusted"
        )
        assert_nothing_kept(daemon)


def test_a_layer_that_does_not_fit_on_the_disk_is_refused_before_it_downloads(
    zlayer_prefix: Paths, private_bus: PrivateBus, registry: Registry
) -> None:
    layer = layer_of(registry, "busybox", "1")
    store = zlayer_prefix.daemon_state("registryd")
    store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(store)], check=True)
    try:
        with (
            registryd_with(zlayer_prefix, private_bus) as daemon,
            fault_proxy(registry.url) as proxy,
        ):
            usage = os.statvfs(store)
            free = usage.f_bavail * usage.f_frsize
            message = daemon.failure("pull", f"{proxy.host}/busybox:1")
            assert message == (
                f"error: not enough space in {store}: layer {layer['digest'][7:19]} needs "
                f"{human_size(layer['size'])}, {human_size(free)} free; free some space "
                "(zlayerctl system prune) or move the store to a larger disk, then pull again"
            )
            assert layer["digest"] not in [digest for digest, _ in proxy.ranges]
            assert_nothing_kept(daemon)
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_a_disk_that_fills_during_a_download_of_no_declared_size_says_so(
    zlayer_prefix: Paths, private_bus: PrivateBus, registry: Registry
) -> None:
    """No size to check first: the full disk is told as such, not as a corrupt blob."""
    body, _ = manifest_of(registry, "busybox", "1")
    manifest = json.loads(body)
    digest = manifest["layers"][0]["digest"]
    del manifest["layers"][0]["size"]
    put_manifest(registry, "busybox", "nosize", manifest)
    store = zlayer_prefix.daemon_state("registryd")
    store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(store)], check=True)
    try:
        with registryd_with(zlayer_prefix, private_bus) as daemon:
            message = daemon.failure("pull", f"{registry.host}/busybox:nosize")
            assert message == (
                f"error: not enough space in {store}: the disk filled while layer "
                f"{digest[7:19]} downloaded; free some space (zlayerctl system prune) or move "
                "the store to a larger disk, then pull again"
            )
            assert os.listdir(daemon.store / "tmp") == []
            assert daemon.images() == [] and daemon.layers() == set()
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_max_layer_unpacked_size_bounds_pulled_and_imported_layers(
    zlayer_prefix: Paths,
    private_bus: PrivateBus,
    registry: Registry,
    busybox_image: dict[str, Path],
) -> None:
    """busybox's layer unpacks to about 2 MB: a limit of 1 MB refuses it, pulled or imported."""
    layer = layer_of(registry, "busybox", "1")
    with registryd_with(
        zlayer_prefix, private_bus, "max_layer_unpacked_size = 1000000\n"
    ) as daemon:
        message = daemon.failure("pull", f"{registry.host}/busybox:1")
        assert message == (
            f"error: layer {layer['digest']} unpacks to more than 976.6 KiB, the limit; raise "
            "max_layer_unpacked_size in registryd.toml if the image is trusted"
        )
        assert_nothing_kept(daemon)
        # An import unpacks its layers at once, under the same limit.
        message = daemon.failure("image", "import", str(busybox_image["oci"]))
        assert message.startswith("error: layer sha256:") and message.endswith(
            " unpacks to more than 976.6 KiB, the limit; raise max_layer_unpacked_size in "
            "registryd.toml if the image is trusted"
        )
        assert daemon.images() == [] and os.listdir(daemon.store / "tmp") == []


# ---------------------------------------------------------------- credentials


def test_credentials_never_go_to_a_plain_http_realm_on_another_host(
    zlayer_prefix: Paths,
    private_bus: PrivateBus,
    busybox_image: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The registry is on 127.0.0.1, its token realm on 127.0.0.2: another host, plain HTTP."""
    tokens = TokenServer(tmp_path, host="127.0.0.2")
    server = start_registry(tokens.registry_auth())
    try:
        skopeo_copy(
            f"oci:{busybox_image['oci']}",
            f"docker://{server.host}/team/busybox:1",
            f"--dest-creds={USER}:{PASSWORD}",
        )
        tokens.requests.clear()
        with registryd_with(zlayer_prefix, private_bus) as daemon:
            refused = (
                f"error: the registry {server.host} wants credentials sent to its token service "
                f"http://127.0.0.2:{tokens.port} over plain HTTP, on another host than the "
                "registry's own (127.0.0.1); ZLayer will not send them there: ask its operator "
                "to serve the token service over HTTPS"
            )
            assert daemon.failure("login", server.host, "-u", USER, "-p", PASSWORD) == refused
            # Nor the user's own credentials, passed along with a pull.
            docker_config = tmp_path / "docker"
            docker_config.mkdir()
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            (docker_config / "config.json").write_text(
                json.dumps({"auths": {server.host: {"auth": auth}}})
            )
            pull = daemon.ctl(
                "pull", f"{server.host}/team/busybox:1", env={"DOCKER_CONFIG": str(docker_config)}
            )
            assert pull.returncode == 1 and pull.stderr.strip() == refused
        assert tokens.requests and not any(r["authorized"] for r in tokens.requests)
    finally:
        server.stop()
        tokens.close()


def test_a_login_is_not_proven_by_an_anonymous_token_from_a_realm_it_may_not_use(
    zlayer_prefix: Paths, private_bus: PrivateBus, tmp_path: Path
) -> None:
    """A realm on another host that hands anyone a token: the login must still fail, and
    the credentials must not be kept, as a token got without them proves nothing."""
    tokens = TokenServer(tmp_path, host="127.0.0.2", anonymous=True)
    server = start_registry(tokens.registry_auth())
    try:
        with registryd_with(zlayer_prefix, private_bus) as daemon:
            message = daemon.failure("login", server.host, "-u", USER, "-p", PASSWORD)
            assert "ZLayer will not send them there" in message
            assert not (daemon.store / "auth.json").exists()
        assert not any(r["authorized"] for r in tokens.requests)
    finally:
        server.stop()
        tokens.close()


def test_credentials_for_an_https_registry_never_go_to_a_plain_http_realm(
    zlayer_prefix: Paths,
    private_bus: PrivateBus,
    busybox_image: dict[str, Path],
    tmp_path: Path,
) -> None:
    """An HTTPS registry (a mirror: loopback registries are otherwise spoken to over plain
    HTTP) whose token realm is on its own host but over plain HTTP."""
    certificate, key = tls_files(tmp_path)
    tokens = TokenServer(tmp_path)
    server = start_registry(tokens.registry_auth(), tls=(certificate, key))
    try:
        skopeo_copy(
            f"oci:{busybox_image['oci']}",
            f"docker://{server.host}/team/busybox:1",
            f"--dest-creds={USER}:{PASSWORD}",
        )
        tokens.requests.clear()
        with registryd_with(
            zlayer_prefix,
            private_bus,
            f'mirrors = {{"127.0.0.1:1" = ["https://{server.host}"]}}\n',
            env={"SSL_CERT_FILE": str(certificate)},
        ) as daemon:
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            (daemon.store / "auth.json").write_text(
                json.dumps({"auths": {server.host: {"auth": auth}}})
            )
            # The mirror fails, then the registry itself (nothing listens on port 1).
            message = daemon.failure("pull", "127.0.0.1:1/team/busybox:1")
            assert message == "error: cannot reach registry 127.0.0.1:1: connection refused"
            log = stop_for_log(daemon)
        assert (
            f"wants credentials sent to its token service http://127.0.0.1:{tokens.port} over "
            "plain HTTP, while the registry itself uses HTTPS; ZLayer will not send them there"
        ) in log
        assert tokens.requests and not any(r["authorized"] for r in tokens.requests)
    finally:
        server.stop()
        tokens.close()
