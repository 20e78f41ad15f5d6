"""zlayer-registryd pushing to a real registry, exporting and pruning, through zlayerctl.

What registryd pushes is read back by skopeo (and compared by manifest
digest); an exported archive is read back by ``image import`` and by skopeo.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from shared.busybox_image import Entry, make_image, make_tar, write_oci_layout
from tests.integration.test_daemon import start, stop
from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import (
    Registry,
    need_tools,
    oci_manifest_digest,
    skopeo_copy,
)

BUSYBOX = "docker.io/zlayer/busybox:latest"


def push_json(registryd: Registryd, *args: str) -> dict[str, str]:
    result: dict[str, str] = json.loads(registryd.ok("image", "push", *args, "--format", "json"))
    return result


def last_job_states(registryd: Registryd) -> list[str]:
    jobs = json.loads(registryd.call("list_jobs"))
    return [item["state"] for item in jobs[-1]["items"]]


def test_skopeo_reads_what_image_push_pushed_and_mounts_are_used(
    registryd: Registryd, registry: Registry, busybox_image: dict[str, Path], tmp_path: Path
) -> None:
    info = registryd.import_(busybox_image["oci"])
    dest = f"{registry.host}/pushed/busybox:1"
    result = push_json(registryd, "zlayer/busybox", dest)
    assert result == {"reference": dest, "digest": info.manifest_digest, "id": info.id}
    assert sorted(last_job_states(registryd)) == ["pushed", "pushed"]
    copied = tmp_path / "copied"
    skopeo_copy(f"docker://{dest}", f"oci:{copied}")
    assert oci_manifest_digest(copied) == info.manifest_digest

    # Pushing again finds every blob there (HEAD) and sends only the manifest.
    assert registryd.ok("image", "push", "zlayer/busybox", dest).strip() == (
        f"pushed {dest}: {info.manifest_digest}"
    )
    assert last_job_states(registryd) == ["exists", "exists"]

    # A pulled image pushed to another repository of its registry is mounted, not sent.
    pulled = json.loads(registryd.ok("pull", f"{registry.host}/busybox:1", "--format", "json"))
    push_json(registryd, f"{registry.host}/busybox:1", f"{registry.host}/mounted/busybox:2")
    assert last_job_states(registryd) == ["mounted", "mounted"]
    skopeo_copy(f"docker://{registry.host}/mounted/busybox:2", f"oci:{tmp_path / 'mounted'}")
    assert oci_manifest_digest(tmp_path / "mounted") == pulled["manifest_digest"]


def test_chunked_upload_of_a_large_layer(
    registryd: Registryd, registry: Registry, tmp_path: Path
) -> None:
    config = registryd.paths.daemon_config("registryd")
    config.write_text(config.read_text() + "chunk_size = 65536\n")
    registryd.stop()
    registryd.start()
    big = make_tar([Entry("data", "file", os.urandom(300_000))])
    layout = write_oci_layout(make_image([big], "localhost/big:1"), tmp_path / "big", "none")
    info = registryd.import_(layout)
    dest = f"{registry.host}/chunked:1"
    assert push_json(registryd, "localhost/big:1", dest)["digest"] == info.manifest_digest
    # skopeo would compress the uncompressed layer unless told to keep it as it is.
    skopeo_copy(f"docker://{dest}", f"oci:{tmp_path / 'back'}", "--preserve-digests")
    assert oci_manifest_digest(tmp_path / "back") == info.manifest_digest


def test_push_errors_are_one_sentence(registryd: Registryd, busybox_image: dict[str, Path]) -> None:
    registryd.import_(busybox_image["oci"])
    assert "is not on this node" in registryd.failure("image", "push", "nothing:1", "x/y:1")
    message = registryd.failure("image", "push", "zlayer/busybox", "127.0.0.1:9/busybox:1")
    assert message == "error: cannot reach registry 127.0.0.1:9: connection refused"


def test_export_and_import_round_trip(
    registryd: Registryd, busybox_image: dict[str, Path], tmp_path: Path
) -> None:
    info = registryd.import_(busybox_image["oci"])
    for name, extra in (("plain.tar", ()), ("packed.tar.gz", ("--gzip",))):
        archive = tmp_path / name
        out = registryd.ok("export", "zlayer/busybox", "-o", str(archive), *extra)
        assert out.strip() == f"exported {BUSYBOX} to {archive}"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        registryd.ok("image", "rm", "zlayer/busybox")
        registryd.assert_empty()
        again = registryd.import_(archive)
        assert (again.id, again.manifest_digest, again.names) == (
            info.id,
            info.manifest_digest,
            [BUSYBOX],
        )
    need_tools("skopeo")
    inspected = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{tmp_path / 'plain.tar'}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspected.stdout)["Digest"] == info.manifest_digest
    assert "is not on this node" in registryd.failure(
        "export", "nothing:1", "-o", str(tmp_path / "x.tar")
    )
    assert not (tmp_path / "x.tar").exists()


def test_prune_asks_agentd_and_removes_unused_images(
    registryd: Registryd, busybox_image: dict[str, Path]
) -> None:
    registryd.import_(busybox_image["oci"])
    # Without agentd's answer no image can be called unused: nothing is removed.
    message = registryd.failure("system", "prune", "-f")
    assert message == (
        "error: cannot tell which images replicas use: zlayer-agentd does not answer; "
        "start it (`zlayerctl status` shows it) and prune again"
    )
    assert len(registryd.images()) == 1
    (registryd.store / "partial" / ("a" * 64)).write_bytes(b"left by a pull")

    agentd = start("agentd", registryd.bus, None)
    try:
        for _ in range(100):
            result = registryd.ctl("system", "prune", "-f", "--format", "json")
            if result.returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert result.returncode == 0, result.stderr
        pruned = json.loads(result.stdout)
        assert pruned["images"] == [BUSYBOX] and len(pruned["blobs"]) == 3
        assert pruned["bytes"] > 500_000
    finally:
        stop(agentd)
    registryd.assert_empty()
    assert os.listdir(registryd.store / "partial") == []
