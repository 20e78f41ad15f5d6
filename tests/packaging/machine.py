"""A Debian 12 machine with a real systemd, booted with systemd-nspawn, for package tests.

The root file system is made by debootstrap (minbase, with what the package
depends on already included, so the package installs with no network; buildah
is added with apt-get in a chroot, as debootstrap cannot configure it), then
booted with ``systemd-nspawn -b`` in a network namespace of its own. Commands
run inside with ``nsenter`` into the machine's PID 1. Everything is undone
when it stops: the machine is powered off (SIGTERM to nspawn, which asks
systemd inside to shut down), its root removed, and the cgroups nspawn made
for it removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
# What the package depends on or the tests use inside, installed by debootstrap.
PACKAGES = ",".join(
    ("systemd", "systemd-sysv", "dbus", "python3", "crun", "conmon", "iproute2", "nftables",
     "procps", "busybox-static", "tini", "curl")
)  # fmt: skip
# Installed with apt-get in a chroot before boot: debootstrap cannot configure these.
LATER_PACKAGES = ("buildah",)
BOOT_TIMEOUT = 90.0
# A root shell's environment inside, not the test run's (ZLAYER_PREFIX and the like).
MACHINE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 ``URIs:`` or a ``deb`` line)."""
    for path in SOURCES:
        if not path.is_file():
            continue
        text = path.read_text()
        found = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", text, re.M
        )
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


class Machine:
    """One booted machine; :meth:`run` is a command as root inside it."""

    def __init__(self, root: Path, nspawn: subprocess.Popen[bytes], log: Path) -> None:
        self.root = root
        self.nspawn = nspawn
        self.log = log
        self.leader = 0  # the host PID of the machine's systemd

    @classmethod
    def create(cls, cache: Path) -> Machine:
        root = Path(tempfile.mkdtemp(prefix="zlmachine-"))
        root.chmod(0o755)  # the machine's "/": its non-root services must traverse it
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                 f"--cache-dir={cache}", SUITE, str(root), debian_mirror()],
                check=True, capture_output=True, timeout=600,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            remove_root(root)
            tail = exc.stdout.decode(errors="replace")[-2000:]
            raise RuntimeError(f"debootstrap failed: {tail}") from None
        except BaseException:
            remove_root(root)
            raise
        later = subprocess.run(
            ["chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends",
             *LATER_PACKAGES],
            capture_output=True, text=True, timeout=600,
            env={**MACHINE_ENV, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
        if later.returncode != 0:
            remove_root(root)
            wanted = " ".join(LATER_PACKAGES)
            raise RuntimeError(f"apt-get install {wanted}: {later.stderr[-2000:]}")
        log = root.parent / f"{root.name}.log"
        nspawn = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network",
             "--console=passive", "-D", str(root), "-b"],
            stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        machine = cls(root, nspawn, log)
        try:
            machine._wait_for_boot()
        except BaseException:
            machine.stop()
            raise
        return machine

    def _wait_for_boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while state not in ("running", "degraded"):
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the machine did not boot ({state or 'no systemd'})")
            time.sleep(0.2)
            # nspawn's child becomes the machine's systemd once it has set the machine up.
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            found = children.read_text().split() if children.exists() else []
            if not found or Path(f"/proc/{found[0]}/comm").read_text().strip() != "systemd":
                continue
            self.leader = int(found[0])
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT
            ).stdout.strip()
        # Controllers are read-only inside until remounted; containers need them.
        self.run(
            "sh", "-c",
            "for c in /sys/fs/cgroup/*/; do mount -o remount,bind,rw \"$c\"; done; "
            "mount -o remount,rw /sys/fs/cgroup; systemctl daemon-reexec",
        )  # fmt: skip

    def run(
        self, *argv: str, check: bool = True, timeout: float = 180, cwd: str = "/root"
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "sh", "-c", 'cd "$0" && exec "$@"', cwd,
             *argv],
            capture_output=True, text=True, timeout=timeout, env=MACHINE_ENV,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {result.returncode}: {result.stderr}{result.stdout}"
            )
        return result

    def stop(self) -> None:
        """Power off (nspawn passes SIGTERM on as a clean shutdown), then remove the root."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # nspawn killed alone would leave the machine's systemd running, reparented
                # to ours: end it first by its PID (nspawn, its parent, still lives, so the
                # PID is still its), the PID 1 of the machine's namespace, so everything
                # inside goes with it.
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.nspawn.kill()
                self.nspawn.wait()
        remove_root(self.root)
        self.log.unlink(missing_ok=True)


def remove_root(root: Path) -> None:
    """Remove a machine's root, unmounting first what is mounted under it: debootstrap
    killed at its timeout leaves the host's /proc and /sys mounted there, and removing
    the tree would walk into them (rmdir empties the host's cgroups)."""
    prefix = f"{root}/"
    with open("/proc/self/mountinfo") as handle:
        mounted = [line.split()[4] for line in handle if line.split()[4].startswith(prefix)]
    for target in sorted(mounted, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", target], capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)


def nspawn_cgroups() -> set[Path]:
    """The ``payload`` cgroups nspawn makes beside itself where systemd is not PID 1."""
    return {p for p in Path("/sys/fs/cgroup").glob("*/payload") if p.is_dir()}


def remove_cgroup_tree(top: Path) -> None:
    """Remove a machine's cgroups, deepest first.

    A machine stopped in the middle of a failed test may leave a replica's processes
    (started inside it, so ours) in a cgroup, or ones still being reaped: they are
    killed by the PIDs the cgroup lists, and each removal is retried while the kernel
    still calls the cgroup busy.
    """
    for path in [*sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True), top]:
        deadline = time.monotonic() + 15
        while True:
            for pid in _cgroup_pids(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []
