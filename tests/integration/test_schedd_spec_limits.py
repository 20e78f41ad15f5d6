"""Specs that cross the bus, against the real zlayer-schedd on a private bus.

- a spec over schedd's size limit is refused with one sentence, by Deploy
  and Plan alike, before it is parsed;
- a large spec is parsed off the event loop: schedd answers Status (and its
  watchdog) while a Plan of it is still being parsed.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator

import pytest

from shared.bus import InvalidSpecError, NotFoundError, open_bus
from shared.busdaemon import PrivateBus
from shared.clients import SchedulerClient
from shared.paths import Paths
from shared.spec.limits import MAX_SPEC_BYTES
from tests.daemon_process import daemon_process

SMALL = "version: v1\ndeployment: limits\nservices: {}\n"
# Generous: one Status call on an idle schedd takes milliseconds; a spec parsed
# on the event loop held it for seconds.
ANSWER_WITHIN = 2.0


@pytest.fixture
def schedd(private_bus: PrivateBus, zlayer_prefix: Paths) -> Iterator[subprocess.Popen[bytes]]:
    """The real zlayer-schedd on the private bus, once it answers Status."""

    async def ready(process: subprocess.Popen[bytes]) -> None:
        bus = open_bus(private_bus.address)
        client = SchedulerClient(bus)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    await client.status()
                    return
                except Exception:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            bus.close()

    with daemon_process("schedd", private_bus, zlayer_prefix) as (process, _log):
        asyncio.run(ready(process))
        yield process
        assert process.poll() is None, "zlayer-schedd died during the test"


def many_services(count: int, variables: int) -> str:
    lines = ["version: v1", "deployment: many", "services:"]
    for i in range(count):
        lines += [f"  s{i}:", "    image:", "      name: nginx:1", "    env:"]
        lines += [f"      V{j}: value{i}" for j in range(variables)]
    return "\n".join(lines) + "\n"


def test_spec_over_the_limit_is_refused_before_parsing(
    private_bus: PrivateBus, schedd: subprocess.Popen[bytes]
) -> None:
    # Valid YAML: a comment pads it past the limit, so only the size is wrong.
    padding = "#" + "x" * 1023 + "\n"
    big = SMALL + padding * (MAX_SPEC_BYTES // len(padding) + 1)
    assert len(big.encode()) > MAX_SPEC_BYTES

    async def scenario() -> None:
        bus = open_bus(private_bus.address)
        client = SchedulerClient(bus)
        try:
            for call in (client.plan, client.deploy):
                with pytest.raises(InvalidSpecError) as refused:
                    await call(big, "big.zlayer.yml", {})
                message = str(refused.value)
                assert "more than the 1 MiB schedd accepts" in message, message
                assert "\n" not in message
            # Just under the limit is parsed as usual.
            plan = await client.plan(SMALL, "small.zlayer.yml", {})
            assert plan.deployment == "limits"
        finally:
            bus.close()

    asyncio.run(scenario())


def test_schedd_answers_while_a_large_spec_is_parsed(
    private_bus: PrivateBus, schedd: subprocess.Popen[bytes]
) -> None:
    # Within every limit of the spec; parsing it on the event loop held schedd
    # for seconds.
    spec = many_services(1000, 40)
    assert len(spec.encode()) <= MAX_SPEC_BYTES

    async def scenario() -> None:
        bus = open_bus(private_bus.address)
        client = SchedulerClient(bus)
        try:
            plan = asyncio.ensure_future(client.plan(spec, "many.zlayer.yml", {}))
            await asyncio.sleep(0.2)  # the call is on its way
            answered = 0
            while not plan.done():
                started = time.monotonic()
                status = await asyncio.wait_for(client.status(), 60)
                took = time.monotonic() - started
                assert took < ANSWER_WITHIN, f"Status took {took:.1f}s while a Plan was parsed"
                assert status.state == "running"
                answered += 1
                await asyncio.sleep(0.05)
            try:
                result = plan.result()
            except InvalidSpecError:  # a cap on the spec's size may refuse it instead
                pass
            else:
                assert result.deployment == "many" and len(result.actions) == 1000
                # Parsed on the event loop, the first Status would wait for the whole
                # parse and be answered together with the Plan.
                assert answered >= 3, f"Status answered {answered} times during the Plan"
            print(f"\nStatus answered {answered} times while the Plan was parsed")
        finally:
            bus.close()

    asyncio.run(scenario())


def test_get_spec_answers_the_deployed_text_and_names_an_unknown_deployment(
    schedd: subprocess.Popen[bytes], private_bus: PrivateBus
) -> None:
    """GetSpec (the REST API's /deployments/{name}/spec) gives back the spec as deployed,
    comments and layout kept; a deployment that does not exist is NotFoundError's sentence."""
    text = "# kept as written\nversion: v1\ndeployment: limits\nservices: {}\n"

    async def run() -> tuple[str, str]:
        bus = open_bus(private_bus.address)
        client = SchedulerClient(bus)
        try:
            await client.deploy(text, "limits.zlayer.yml", {})
            stored = await client.get_spec("limits")
            with pytest.raises(NotFoundError) as missing:
                await client.get_spec("nosuch")
            await client.down("limits")
            return stored, str(missing.value.args[0])
        finally:
            bus.close()

    stored, sentence = asyncio.run(run())
    assert stored == text
    assert sentence.startswith("there is no deployment named nosuch")
