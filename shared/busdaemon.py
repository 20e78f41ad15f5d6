"""A private dbus-daemon, for hosts without a system bus.

``zlayerctl daemon run`` supervises one; tests and the introspection
generator start one of their own. The bus only accepts connections from the
user that started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>zlayer</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="{uid}"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


class BusStartError(Exception):
    """dbus-daemon is missing or would not start."""


class PrivateBus:
    """One dbus-daemon process listening on ``socket``; a child of the caller."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.config = socket.with_suffix(".conf")
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        """Start the daemon and return its address once it accepts connections."""
        binary = shutil.which("dbus-daemon")
        if binary is None:
            raise BusStartError(
                "dbus-daemon is not installed; install it with `apt-get install dbus-daemon`"
            )
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self.config.write_text(_CONFIG.format(socket=self.socket, uid=os.getuid()))
        self.process = subprocess.Popen(
            [
                binary,
                "--nofork",
                "--nopidfile",
                f"--config-file={self.config}",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        # dbus-daemon prints the address once its socket is listening.
        line = self.process.stdout.readline().decode().strip()
        if not line:
            err = b""
            if self.process.stderr is not None:
                err = self.process.stderr.read()
            self.process.wait()
            raise BusStartError(f"dbus-daemon did not start: {err.decode().strip()}")
        self.address = line
        return line

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self.process = None
        self.socket.unlink(missing_ok=True)
        self.config.unlink(missing_ok=True)
