"""Fixtures of the integration tests: the leak check around each, a registry, and the
nodes the API modules share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shared_node_of
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
# The API modules that leave a node as they found it share one node of each kind
# (see ``shared_node_of`` in the tests' conftest).


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
    yield from shared_node_of(
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
    yield from shared_node_of(
        request,
        _shared_nodes,
        "token",
        lambda stack: _start_node(stack, tmp_path_factory, "zlc", "zln", auth=True),
    )
