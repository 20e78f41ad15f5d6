"""Fixtures of the integration tests: the leak check around each, and a registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
