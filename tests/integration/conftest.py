"""Fixtures of the integration tests: the leak check around each, a registry, and the
nodes the API modules share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import running_node
from tests.e2e.node import Node
from tests.integration.test_apid_routes import Api, apid_port
from tests.registry_fixture import Registry, skopeo_copy, start_registry


@pytest.fixture(autouse=True)
def _integration_leak_check(leak_check: None) -> None:
    """Every integration test runs under the leak check."""


@pytest.fixture(scope="module")
def registry(busybox_image: dict[str, Path]) -> Iterator[Registry]:
    """An anonymous docker-registry holding busybox:1 (pushed by skopeo)."""
    server = start_registry()
    try:
        skopeo_copy(f"oci:{busybox_image['oci']}", f"docker://{server.host}/busybox:1")
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- nodes several modules use
#
# Six daemons take seconds to start and to stop: the API modules that leave a node as
# they found it share one node of each kind. It starts with the first module that asks
# for it (module-scoped, so before that test's leak check looks) and stops at the end
# of the last such module of the run.


@pytest.fixture(scope="session")
def _shared_nodes() -> Iterator[dict[str, tuple[ExitStack, Any]]]:
    started: dict[str, tuple[ExitStack, Any]] = {}
    yield started
    for stack, _ in started.values():  # a run cut short: whatever is still up
        stack.close()


def _shared_node(
    request: pytest.FixtureRequest,
    started: dict[str, tuple[ExitStack, Any]],
    kind: str,
    start: Callable[[ExitStack], Any],
) -> Iterator[Any]:
    if kind not in started:
        stack = ExitStack()
        try:
            started[kind] = (stack, start(stack))
        except BaseException:
            stack.close()
            raise
    yield started[kind][1]
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.getparent(pytest.Module) is request.node]
    later = items[max(mine) + 1 :] if mine else []
    if not any(request.fixturename in item.fixturenames for item in later):
        stack, _ = started.pop(kind)
        stack.close()


def _start_node(
    stack: ExitStack, tmp_path_factory: pytest.TempPathFactory, name: str, tag: str, auth: bool
) -> tuple[Node, Api]:
    # The daemons keep the environment they were started with.
    with pytest.MonkeyPatch.context() as patch:
        if auth:
            patch.delenv("ZLAYER_APID_AUTH", raising=False)
        else:
            patch.setenv("ZLAYER_APID_AUTH", "none")
        node = stack.enter_context(
            running_node(Path(f"/tmp/{name}-{os.getpid()}"), tmp_path_factory, network_tag=tag)
        )
    return node, Api(apid_port(node))


@pytest.fixture(scope="module")
def open_api_node(
    request: pytest.FixtureRequest,
    _shared_nodes: dict[str, tuple[ExitStack, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Node, Api]]:
    """The six daemons, apid serving every caller as the admin "local" (auth = "none")."""
    yield from _shared_node(
        request,
        _shared_nodes,
        "open",
        lambda stack: _start_node(stack, tmp_path_factory, "zla", "zle", auth=False),
    )


@pytest.fixture(scope="module")
def token_api_node(
    request: pytest.FixtureRequest,
    _shared_nodes: dict[str, tuple[ExitStack, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Node, Api]]:
    """The six daemons, apid checking bearer tokens; the Api carries none."""
    yield from _shared_node(
        request,
        _shared_nodes,
        "token",
        lambda stack: _start_node(stack, tmp_path_factory, "zlc", "zln", auth=True),
    )
