"""Compiling WebAssembly images as they arrive, before any replica needs them.

registryd signals each image it stores or names (ImageStored: a pull, an
import, a build). A WebAssembly one is compiled here at once, in a thread,
into the compile cache replicas start from (:func:`daemons.agentd.wasm.precompiled`),
so the first replica does not wait for the compile (tens of seconds for a
large component). What is already cached is not compiled again; one module
compiles at a time, in the order the images arrived. Each time the signal is
listened for (at agentd's start, after registryd restarted) the images already
stored are looked at too: those stored while agentd was not listening.

No spec names the image yet, so the code's shape is the likely one: a
component exporting ``wasi:http/incoming-handler`` as ``wasmtime serve`` runs
it (epoch interruption on, for its request timeout), anything else as
``wasmtime run`` without fuel. A replica whose limits shape code otherwise
(``max_fuel``) still compiles its own at its first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from daemons.agentd import wasm
from shared.clients import RegistryClient
from shared.wire.registry import ImageInfo, ImageRootfs

log = logging.getLogger("zlayer.agentd.wasm")

HTTP_HANDLER = "wasi:http/incoming-handler"
RELISTEN_SECONDS = 2.0  # after the signal's subscription failed (registryd restarting)
# From listening to listing the stored images: the subscription is made first, so an image
# stored meanwhile is in the list or in a signal.
SWEEP_AFTER_SECONDS = 1.0


def code_shape(module: Path) -> list[str]:
    """wasmtime's code-shaping options for the way this module will most likely run."""
    from shared.wasm import WasmError, inspect_file

    try:
        found = inspect_file(module)
    except WasmError:
        return wasm.codegen_flags([])  # wasmtime's own compile says what is wrong
    serves = found.kind == "component" and any(
        export.name.startswith(HTTP_HANDLER) for export in found.exports
    )
    # `wasmtime serve` always runs with a request timeout (see wasm.serve_flags).
    return wasm.codegen_flags(["timeout=1ms"] if serves else [])


def precompile(state_dir: Path, rootfs: ImageRootfs) -> tuple[Path, bool]:
    """Compile the image's module into the cache (blocking); the compiled file and
    whether it was compiled now (False: it was cached)."""
    module = wasm.module_path(rootfs)
    runtime = wasm.wasmtime(state_dir / "wasm" / "bin")
    cache = wasm.cache_dir(state_dir)
    before = set(cache.glob("*.cwasm")) if cache.is_dir() else set()
    compiled = wasm.precompiled(runtime, module, code_shape(module), cache)
    return compiled, compiled not in before


class Precompiler:
    """Listens for registryd's ImageStored and compiles each WebAssembly image."""

    def __init__(self, state_dir: Path, registry: RegistryClient) -> None:
        self.state_dir = state_dir
        self.registry = registry
        self.queue: asyncio.Queue[ImageInfo] = asyncio.Queue()
        self.waiting: set[str] = set()  # image ids queued, each compiled once
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._listen(), name="wasm-precompile-listen"),
            asyncio.create_task(self._work(), name="wasm-precompile"),
        ]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        # A compile in its thread is a wasmtime child: stopping it lets the thread end now.
        await asyncio.to_thread(self._stop_compiles)
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def offer(self, image: ImageInfo) -> None:
        if image.runtime == "wasm" and image.id not in self.waiting:
            self.waiting.add(image.id)
            self.queue.put_nowait(image)

    async def _listen(self) -> None:
        while True:
            sweep = asyncio.create_task(self._sweep())
            try:
                async for image in self.registry.images_stored():
                    self.offer(image)
            except Exception as exc:  # the bus or registryd went away: listen again
                log.debug("listening for stored images failed: %s", exc)
            finally:
                sweep.cancel()
            await asyncio.sleep(RELISTEN_SECONDS)

    async def _sweep(self) -> None:
        """Offer the WebAssembly images already stored (those cached are skipped)."""
        await asyncio.sleep(SWEEP_AFTER_SECONDS)
        try:
            images = await self.registry.list_images()
        except Exception as exc:  # registryd not up yet: its signals will come
            log.debug("cannot list the stored images: %s", exc)
            return
        for image in images:
            self.offer(image)

    async def _work(self) -> None:
        while True:
            image = await self.queue.get()
            try:
                await self._compile(image)
            except Exception as exc:  # one image's failure: the next ones still compile
                shown = image.names[0] if image.names else image.id
                log.warning("could not compile the WebAssembly image %s ahead: %s", shown, exc)
            finally:
                self.waiting.discard(image.id)

    async def _compile(self, image: ImageInfo) -> None:
        started = time.monotonic()
        # The image id: the very image signalled, even if its name has moved on since.
        rootfs = await self.registry.ensure_image(image.id, "never")
        compiled, now = await asyncio.to_thread(precompile, self.state_dir, rootfs)
        shown = image.names[0] if image.names else image.id
        if now:
            log.info(
                "compiled the WebAssembly image %s ahead in %.1fs: %s",
                shown,
                time.monotonic() - started,
                compiled.name,
            )

    def _stop_compiles(self) -> None:
        """Kill this process's ``wasmtime compile`` children (only those)."""
        for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for pid in children:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if len(argv) > 1 and argv[1] == b"compile" and b"wasmtime" in argv[0]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
