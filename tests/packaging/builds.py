"""The packages, built in the background.

A build (packaging/build-deb.sh or build-rpm.sh) is a minute or more of pip
installing and packing, mostly waiting on the network and the disk: the .deb's
runs while the test machine is bootstrapped and booted, the .rpm's while the
.deb's tests run. A build makes no mount, link or cgroup, so it cannot show in
a leak check; it runs without a test's prefix or bus in its environment, and
in a process group of its own, which is killed (by its id) if the run ends first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from shared.paths import PREFIX_ENV

REPO = Path(__file__).resolve().parents[2]


class Build:
    """``packaging/SCRIPT OUT``, started at once; :meth:`wait` for what it said."""

    def __init__(self, script: str, out: Path, **env: str) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._stdout = out.parent / f"{out.name}.stdout"
        self._stderr = out.parent / f"{out.name}.stderr"
        clean = {k: v for k, v in os.environ.items() if k not in (PREFIX_ENV, "ZLAYER_BUS_ADDRESS")}
        # Files, not pipes: nobody reads while it runs, and a full pipe would stall it.
        with open(self._stdout, "wb") as stdout, open(self._stderr, "wb") as stderr:
            self.process = subprocess.Popen(
                [str(REPO / "packaging" / script), str(out)],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env={**clean, **env}, start_new_session=True,
            )  # fmt: skip
        self._done: subprocess.CompletedProcess[str] | None = None

    def wait(self, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """The build's end: its exit status, stdout and stderr (killed past ``timeout``)."""
        if self._done is None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop()
            self._done = subprocess.CompletedProcess(
                self.process.args,
                self.process.returncode,
                self._stdout.read_text(errors="replace"),
                self._stderr.read_text(errors="replace"),
            )
        return self._done

    def package(self) -> Path:
        """The package it made (the last line it printed); the build must have worked."""
        built = self.wait()
        assert built.returncode == 0, built.stderr
        return Path(built.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """A build still running (the run ended first) goes, with its pip and rpmbuild."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
