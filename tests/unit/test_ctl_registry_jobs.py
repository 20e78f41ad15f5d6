"""ctl.registry_jobs, what pull, push and export do, loads neither click nor the sdbus clients.

A command line parsed without click (``ctl.readargs``) can then run a pull;
``tests/integration/test_ctl_pull_bus.py`` runs it against a real registryd.
"""

from __future__ import annotations

from ctl import registry_cmd, registry_jobs
from shared import clients
from shared.bus import NotFoundError
from tests.fresh_interpreter import modules_after

SLOW = {"click", "asyncio", "sdbus", "shared.bus", "shared.clients", "rich"}


def test_the_job_bodies_import_no_click_asyncio_sdbus_or_rich() -> None:
    modules = modules_after("import ctl.registry_jobs")
    assert not SLOW & modules, sorted(SLOW & modules)


def test_msgspec_and_the_wire_types_wait_until_a_job_is_started() -> None:
    """They are imported while registryd works on the pull (a cold one overlaps them),
    not before zlayerctl sends it."""
    modules = modules_after(
        "from ctl.readargs import parse, runner; runner(parse(['pull', 'nginx'])[0])"
    )
    assert "ctl.registry_jobs" in modules
    assert not {"msgspec", "shared.wire"} & modules, sorted({"msgspec", "shared.wire"} & modules)


def test_the_constants_are_those_of_the_typed_clients_and_the_commands() -> None:
    assert registry_jobs.FALLBACK_SECONDS == clients.FALLBACK_SECONDS
    assert NotFoundError.dbus_error_name == registry_jobs.NOT_FOUND
    policy = next(p for p in registry_cmd.pull.params if p.name == "policy")
    assert list(policy.type.choices) == list(registry_jobs.POLICIES)  # type: ignore[attr-defined]
