"""A bundle directory on disk, around its overlayfs root file system.

Owns the files of one container's bundle as agentd writes and removes them:
laying the directory out from a :class:`~daemons.agentd.bundle.Bundle`
(``meta.json``, the plan's files and volume directories, ``config.json``),
mounting the image's layers as overlayfs at ``<bundle>/rootfs`` (through
libc's ``mount(2)``, with the kernel's one-page limit on mount options), and
removing it all again: the mount, conmon's exit file and attach socket, and
the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from daemons.agentd.bundle import Bundle
from daemons.agentd.errors import BundleError, ContainerError
from shared.libc import last_errno, libc
from shared.statefile import write_atomically

META = "meta.json"
MAX_OVERLAY_OPTIONS = 4000  # the kernel takes one page of mount options


def _mount_overlay(lower_dirs: list[str], upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={':'.join(lower_dirs)},upperdir={upper},workdir={work}"
    if len(options) > MAX_OVERLAY_OPTIONS:
        raise BundleError(
            f"the image has too many layers ({len(lower_dirs)}) for one overlay mount"
        )
    for lower in lower_dirs:
        if not os.path.isdir(lower):
            raise BundleError(f"the image layer directory {lower} is missing; pull the image again")
    if libc().mount(b"overlay", str(target).encode(), b"overlay", 0, options.encode()) != 0:
        err = last_errno()
        raise ContainerError(f"the root file system could not be mounted: {os.strerror(err)}")


def _unmount(target: Path) -> None:
    if libc().umount2(str(target).encode(), 0) == 0:
        return
    err = last_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return  # not mounted
    # Busy: something still holds it open; detach now, the kernel frees it after.
    if libc().umount2(str(target).encode(), 2) != 0:  # MNT_DETACH
        err = last_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise ContainerError(f"{target} could not be unmounted: {os.strerror(err)}")


def _is_mounted(target: Path) -> bool:
    wanted = str(target)
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == wanted for line in handle)


def lay_out(bundle_dir: Path, meta: dict[str, Any], plan: Bundle, lower_dirs: list[str]) -> None:
    """Write the bundle (which must not exist yet) and mount its root file system: the
    image's layers as overlayfs, or, where the plan says so (``overlay_root`` False),
    nothing: the root is the empty ``rootfs`` directory."""
    bundle_dir.mkdir(parents=True)
    # Not fsynced: the bundle's mount and container do not outlive a power cut.
    write_atomically(bundle_dir / META, json.dumps(meta), durable=False)
    for name in ("rootfs", "upper", "work"):
        (bundle_dir / name).mkdir()
    for name, content in plan.files.items():
        (bundle_dir / name).write_text(content)
    user = plan.config["process"]["user"]
    for directory in plan.directories:
        if not directory.exists():
            directory.mkdir(parents=True)
            # A fresh volume belongs to the container's user, so a
            # non-root process can write to it (as Docker does).
            os.chown(directory, user["uid"], user["gid"])
    (bundle_dir / "config.json").write_text(json.dumps(plan.config, indent=1))
    if not plan.overlay_root:
        return
    _mount_overlay(lower_dirs, bundle_dir / "upper", bundle_dir / "work", bundle_dir / "rootfs")


def remove(bundle_dir: Path, exit_file: Path, socket: Path) -> None:
    """Unmount the root file system and remove the bundle with conmon's exit file
    and attach socket; what is already gone is no error."""
    rootfs = bundle_dir / "rootfs"
    if _is_mounted(rootfs):
        _unmount(rootfs)
    with contextlib.suppress(FileNotFoundError):
        exit_file.unlink()
    if socket.is_symlink() or socket.is_file():
        socket.unlink()
    elif socket.is_dir():
        shutil.rmtree(socket, ignore_errors=True)
    shutil.rmtree(bundle_dir, ignore_errors=True)
