"""zlayerctl pull on this node's bus: the blocking connection, not sdbus, asyncio or rich.

The pull goes to a real zlayer-registryd on a private bus, from a real
docker-registry (behind a proxy that holds a layer where the pull must still be
running). What a user sees is the same as through the typed clients: the lines,
the JSON, Ctrl-C cancelling the job; ``--host`` still sends the pull to a node's API.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientSession, web

from ctl.supervisor import find_executable
from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import FaultProxy, Registry, free_port

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


@dataclass
class HeldProxy(FaultProxy):
    """A proxy that sends each layer's first 32 KiB, then holds the rest until the test
    calls :meth:`release`: the pull is still running when ^C comes, however fast the
    machine (a blob that only trickled out could be whole before the signal arrived)."""

    holding: threading.Event = field(default_factory=threading.Event)  # a blob is held
    released: threading.Event = field(default_factory=threading.Event)
    seen: list[str] = field(default_factory=list)  # each request, for a failure's message

    def release(self) -> None:
        self.released.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        if "/blobs/sha256:" not in request.path or request.method != "GET":
            return await super()._forward(request)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with (
            ClientSession(auto_decompress=False) as session,
            session.get(self.upstream + request.path_qs, headers=headers) as upstream,
        ):
            data = await upstream.read()
            out_headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            status = upstream.status
        if status not in (200, 206) or len(data) <= 32 << 10:  # an error, or a config
            return web.Response(status=status, body=data, headers=out_headers)
        response = web.StreamResponse(status=status, headers=out_headers)
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: 32 << 10])
        self.holding.set()
        while not self.released.is_set():
            await asyncio.sleep(0.02)
        if request.transport is None or request.transport.is_closing():
            return response  # the client went away (its pull was cancelled)
        await response.write(data[32 << 10 :])
        await response.write_eof()
        return response


@contextmanager
def held_proxy(upstream: str) -> Iterator[HeldProxy]:
    proxy = HeldProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.close()


def test_ctrl_c_during_a_pull_cancels_its_job(registryd: Registryd, registry: Registry) -> None:
    with held_proxy(registry.url) as proxy:
        image = f"{proxy.host}/busybox:1"
        puller = subprocess.Popen(
            [find_executable("zlayerctl"), "pull", image],
            env=dict(os.environ, ZLAYER_BUS_ADDRESS=registryd.bus.address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # A layer has begun to arrive and the rest of it is held: the pull runs on.
            assert proxy.holding.wait(60), (puller.poll(), proxy.seen)
            assert puller.poll() is None
            puller.send_signal(signal.SIGINT)
            out, err = puller.communicate(timeout=30)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
        # What the user sees at ^C: nothing pulled, the blank line that closes the
        # terminal's ^C, and the shell's 130.
        assert puller.returncode == 130, err
        assert "Traceback" not in err and out == "" and err.strip() == "", err
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
