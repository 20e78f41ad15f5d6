"""One node's daemons for end-to-end tests, driven only through zlayerctl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctl.supervisor import find_executable
from shared.paths import PREFIX_ENV, Paths

IMAGE = "zlayer/busybox:latest"


class Node:
    """The daemons of this module and a way to run zlayerctl against them."""

    def __init__(self, paths: Paths, workdir: Path, http_port: int = 0) -> None:
        self.paths = paths
        self.workdir = workdir
        self.http_port = http_port  # a free port for the tests' public http endpoints
        self.env = dict(os.environ, **{PREFIX_ENV: str(paths.prefix)})
        self.env.pop("ZLAYER_BUS_ADDRESS", None)

    def ctl(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [find_executable("zlayerctl"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=self.workdir,
        )
        assert "Traceback" not in result.stderr, result.stderr
        if check:
            assert result.returncode == 0, f"zlayerctl {' '.join(args)}: {result.stderr}"
        return result

    def spec(self, name: str, body: str) -> Path:
        path = self.workdir / f"{name}.zlayer.yml"
        path.write_text(textwrap.dedent(body))
        return path

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        out = self.ctl("ps", "--containers", "-d", deployment, "--format", "json", check=True)
        return [r for r in json.loads(out.stdout) if r["deployment"] == deployment]

    def services(self, deployment: str) -> dict[str, dict[str, Any]]:
        out = self.ctl("ps", "-d", deployment, "--format", "json", check=True)
        statuses = json.loads(out.stdout)
        return {s["name"]: s for d in statuses for s in d["services"]}

    def daemon_pid(self, name: str) -> int:
        rows = json.loads(self.ctl("status", "--format", "json").stdout)
        return int(next(r["pid"] for r in rows if r["name"] == name))


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
