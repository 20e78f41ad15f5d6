"""Jobs on the bus as systemd has them: JobNew, a Job1 object while it runs, JobRemoved.

A real zlayer-registryd on a private dbus-daemon pulls from a real
docker-registry; a slow proxy in front of it keeps a pull running long enough
to watch and cancel it through its own object.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import sdbus

from shared.bus import DAEMONS_BY_NAME, NotFoundError, open_bus
from shared.clients import RegistryClient
from shared.wire import decode
from shared.wire.jobs import JobInfo
from shared.wire.registry import ImageInfo, ImageRootfs
from tests.integration.test_registryd import Registryd
from tests.integration.test_registryd import registryd as registryd
from tests.registry_fixture import Registry, fault_proxy

T = TypeVar("T")
REGISTRY = DAEMONS_BY_NAME["registryd"]


def on_bus(registryd: Registryd, body: Callable[[RegistryClient], Awaitable[T]]) -> T:
    async def run() -> T:
        bus = open_bus(registryd.bus.address)
        try:
            return await body(RegistryClient(bus))
        finally:
            bus.close()

    return asyncio.run(run())


def test_a_pull_is_announced_followed_by_its_progress_and_ends_with_its_result(
    registryd: Registryd, registry: Registry
) -> None:
    async def body(client: RegistryClient) -> tuple[JobInfo, list[JobInfo], list[tuple[int, str]]]:
        new: list[tuple[int, str]] = []
        slot = await client._bus.match_signal_async(
            REGISTRY.bus_name,
            REGISTRY.object_path,
            REGISTRY.bus_name,
            "JobNew",
            lambda message: new.append(message.get_contents()[:2]),  # type: ignore[index]
        )
        seen: list[JobInfo] = []
        with contextlib.closing(slot):
            info = await client.run_job(
                lambda: client.pull(f"{registry.host}/busybox:1", "always", ""),
                on_progress=lambda job: seen.append(decode(_encode(job), JobInfo)),
            )
            await asyncio.sleep(0.2)  # the JobNew signal may still be on its way
        return info, seen, new

    info, seen, new = on_bus(registryd, body)
    assert info.state == "done", info.error
    assert info.kind == "pull" and info.finished_at is not None
    image = decode(info.result, ImageInfo)
    assert f"{registry.host}/busybox:1" in image.names
    assert [job_id for job_id, _ in new] == [info.id]
    assert new[0][1] == f"{REGISTRY.object_path}/job/{info.id}"
    # The progress the client saw: one item per layer, each finished at the end.
    assert seen and len(seen[-1].items) == len(image.layers)
    assert all(item.state in ("done", "exists") for item in seen[-1].items)


def test_a_job_object_exists_while_it_runs_and_cancel_on_it_ends_the_job(
    registryd: Registryd, registry: Registry
) -> None:
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True

        async def body(client: RegistryClient) -> tuple[JobInfo, JobInfo, str]:
            job_id = await client.pull(f"{proxy.host}/busybox:1", "always", "")
            job = client.job(job_id)
            running = await job.info()
            state = await job._proxy.state
            waiter = asyncio.ensure_future(client.run_job(_started(job_id)))
            await asyncio.sleep(0.2)
            await job.cancel()
            final = await asyncio.wait_for(waiter, 30)
            return running, final, state

        running, final, state = on_bus(registryd, body)
    assert running.state == "running" and state == "running"
    assert running.kind == "pull" and running.target.endswith("/busybox:1")
    assert final.state == "cancelled" and final.error == "the job was cancelled"

    async def gone(client: RegistryClient) -> None:
        with pytest.raises(sdbus.SdBusBaseError):
            await client.job(final.id).info()
        assert (await client.get_job(final.id)).state == "cancelled"  # still readable by id
        # An ended job cannot be cancelled; an id never given out is not known.
        with pytest.raises(NotFoundError, match=f"job {final.id} is not running"):
            await client.cancel_job(final.id)
        with pytest.raises(NotFoundError, match="job 99999 is not known to zlayer-registryd"):
            await client.get_job(99999)

    on_bus(registryd, gone)


def _started(job_id: int) -> Callable[[], Awaitable[int]]:
    async def start() -> int:
        return job_id

    return start


def _encode(job: JobInfo) -> str:
    from shared.wire import encode

    return encode(job)


def test_ensure_image_pulls_as_a_job_and_answers_at_once_once_the_image_is_here(
    registryd: Registryd, registry: Registry
) -> None:
    image = f"{registry.host}/busybox:1"

    async def body(client: RegistryClient) -> tuple[tuple[int, str], list[JobInfo], str, int]:
        first = await client._proxy.ensure_image_job(image, "if_not_present")
        seen: list[JobInfo] = []
        pulled = await client.ensure_image_job(
            image, "if_not_present", lambda job: seen.append(decode(_encode(job), JobInfo))
        )
        again_id, again = await client._proxy.ensure_image_job(image, "if_not_present")
        assert decode(again, ImageRootfs).image.id == pulled.image.id
        return first, seen, pulled.image.id, again_id

    (job_id, rootfs), seen, image_id, again_id = on_bus(registryd, body)
    # Not here: a job, whose result is the unpacked image; here: no job, the answer at once.
    assert job_id > 0 and rootfs == ""
    assert again_id == 0
    final = on_bus(registryd, lambda client: client.get_job(job_id))
    assert (final.kind, final.state, final.target) == ("ensure-image", "done", image)
    assert decode(final.result, ImageRootfs).image.id == image_id
    assert seen and all(item.state in ("done", "exists") for item in seen[-1].items)


def test_an_ensure_image_job_is_cancelled_and_a_failed_one_raises_its_sentence(
    registryd: Registryd, registry: Registry
) -> None:
    with fault_proxy(registry.url) as proxy:
        proxy.slow = True

        async def cancelled(client: RegistryClient) -> tuple[JobInfo, JobInfo]:
            job_id, _ = await client._proxy.ensure_image_job(f"{proxy.host}/busybox:1", "always")
            waiter = asyncio.ensure_future(client.run_job(_started(job_id)))
            await asyncio.sleep(0.2)
            running = await client.job(job_id).info()
            await client.job(job_id).cancel()
            return running, await asyncio.wait_for(waiter, 30)

        running, final = on_bus(registryd, cancelled)
    assert (running.kind, running.state) == ("ensure-image", "running")
    assert final.state == "cancelled" and final.error == "the job was cancelled"

    async def failing(client: RegistryClient) -> None:
        with pytest.raises(NotFoundError, match="pull policy is never"):
            await client.ensure_image_job(f"{registry.host}/busybox:nothing", "never")
        with pytest.raises(NotFoundError, match="nothing") as caught:
            await client.ensure_image_job(f"{registry.host}/busybox:nothing", "always")
        assert "\n" not in str(caught.value)

    on_bus(registryd, failing)
