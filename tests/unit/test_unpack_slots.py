"""Receiving threads work one per core at a time, and a download waiting for its next bytes
holds no place: more stalled downloads than cores never hold back one whose bytes are here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import tempfile
from pathlib import Path

from daemons.registryd.unpack import Pipe, Received, receive_blob
from shared.busybox_image import Entry, compress, make_tar


def _blob(number: int) -> tuple[bytes, str]:
    data = make_tar([Entry(f"f{number}", "file", os.urandom(300_000), mode=0o644)])
    return compress(data, "gzip"), "sha256:" + hashlib.sha256(data).hexdigest()


def test_stalled_downloads_do_not_hold_back_one_whose_bytes_are_here() -> None:
    stalled = (os.cpu_count() or 2) + 2

    async def run(work: Path) -> list[Received]:
        loop = asyncio.get_running_loop()
        blobs = [_blob(n) for n in range(stalled + 1)]
        pipes = [Pipe() for _ in blobs]
        with concurrent.futures.ThreadPoolExecutor(len(blobs)) as pool:
            receivers = [
                loop.run_in_executor(
                    pool,
                    receive_blob,
                    pipe,
                    work / f"partial-{n}",
                    0,
                    ("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob)),
                    work / f"tree-{n}",
                    diff_id,
                )
                for n, (pipe, (blob, diff_id)) in enumerate(zip(pipes, blobs, strict=True))
            ]
            # every download but the last sends half its blob, then waits
            for pipe, (blob, _) in zip(pipes[:-1], blobs[:-1], strict=True):
                await pipe.write(blob[: len(blob) // 2])
            last_pipe, (last_blob, _) = pipes[-1], blobs[-1]
            await last_pipe.write(last_blob)
            last_pipe.end()
            done = await asyncio.wait_for(receivers[-1], timeout=60)
            assert done.unpacked
            assert not any(r.done() for r in receivers[:-1])  # still waiting for their bytes
            for pipe, (blob, _) in zip(pipes[:-1], blobs[:-1], strict=True):
                await pipe.write(blob[len(blob) // 2 :])
                pipe.end()
            return list(await asyncio.wait_for(asyncio.gather(*receivers), timeout=60))

    with tempfile.TemporaryDirectory(prefix="zlslots-") as name:
        received = asyncio.run(run(Path(name)))
        assert all(r.unpacked for r in received)
        assert sorted(p.name for p in Path(name).iterdir() if p.name.startswith("tree-")) == sorted(
            f"tree-{n}" for n in range(stalled + 1)
        )
