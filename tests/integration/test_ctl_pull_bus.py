"""zlayerctl pull on this node's bus: the blocking connection, not sdbus, asyncio or rich.

The pull goes to a real zlayer-registryd on a private bus, from a real
docker-registry (behind the fault proxy where it must be slow). What a user
sees is the same as through the typed clients: the lines, the JSON, Ctrl-C
cancelling the job; ``--host`` still sends the pull to a node's API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctl.supervisor import find_executable
from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import Registry, fault_proxy, free_port

# What the pull must not load: sdbus and asyncio (the typed clients) and rich.progress
# (the bars, only for a terminal).
SLOW = ("sdbus", "asyncio", "shared.bus", "shared.clients", "rich.progress")


def _imported(stderr: str) -> set[str]:
    """The modules ``python -X importtime`` says it imported."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _traced(registryd: Registryd, *args: str) -> tuple[str, set[str]]:
    """``zlayerctl ARGS``'s stdout and the modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from ctl.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout, _imported(result.stderr)


def _pull_traced(registryd: Registryd, image: str) -> tuple[dict[str, object], set[str]]:
    out, modules = _traced(registryd, "pull", image, "--format", "json")
    info: dict[str, object] = json.loads(out)
    return info, modules


def test_a_cold_and_a_warm_pull_and_an_export_load_no_sdbus_asyncio_or_progress_bars(
    registryd: Registryd, registry: Registry, tmp_path: Path
) -> None:
    image = f"{registry.host}/busybox:1"
    cold, modules = _pull_traced(registryd, image)
    assert cold["names"] == [image]
    assert not set(SLOW) & modules, sorted(set(SLOW) & modules)
    warm, modules = _pull_traced(registryd, image)
    assert warm["id"] == cold["id"]
    assert not set(SLOW) & modules, sorted(set(SLOW) & modules)
    # the lines a person reads, as before
    out = registryd.ok("pull", image)
    assert out == f"pulled {image}: {cold['id']}\n"
    jobs = json.loads(registryd.call("list_jobs"))
    assert [job["state"] for job in jobs] == ["done", "done", "done"]

    # export hands registryd the archive's descriptor over the same connection
    archive = tmp_path / "busybox.tar"
    out, modules = _traced(registryd, "export", image, "-o", str(archive))
    assert out == f"exported {image} to {archive}\n"
    assert not set(SLOW) & modules, sorted(set(SLOW) & modules)
    assert registryd.import_(archive).id == cold["id"]


def test_ctrl_c_during_a_pull_cancels_its_job(registryd: Registryd, registry: Registry) -> None:
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True
        image = f"{proxy.host}/busybox:1"
        partial = registryd.store / "partial"
        puller = subprocess.Popen(
            [find_executable("zlayerctl"), "pull", image],
            env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not any(f.stat().st_size > 0 for f in partial.iterdir()):
                assert time.monotonic() < deadline, puller.poll()
                time.sleep(0.02)
            puller.send_signal(signal.SIGINT)
            out, err = puller.communicate(timeout=30)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
        assert puller.returncode == 130, err
        assert "Traceback" not in err and out == ""
        deadline = time.monotonic() + 30
        while (jobs := json.loads(registryd.call("list_jobs")))[-1]["state"] == "running":
            assert time.monotonic() < deadline, jobs
            time.sleep(0.05)
        assert [(job["kind"], job["state"]) for job in jobs] == [("pull", "cancelled")]
    assert registryd.images() == []


def test_with_host_the_pull_goes_to_the_api_not_the_bus(
    registryd: Registryd, registry: Registry, tmp_path: Path
) -> None:
    api = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k not in ("ZLAYER_HOST", "ZLAYER_TOKEN")}
    env.update(ZLAYER_BUS_ADDRESS=registryd.bus.address, XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run(
        [find_executable("zlayerctl"), "--host", api, "pull", f"{registry.host}/busybox:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert api in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert json.loads(registryd.call("list_jobs")) == []
