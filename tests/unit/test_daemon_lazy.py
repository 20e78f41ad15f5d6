"""An idle daemon does not import what only some requests need.

Each daemon's entry module and what it loads to start are imported in a
fresh interpreter; the heavy packages a daemon uses only for a spec, an HTTP
health check, a cron job or a TLS route must not be among them.
"""

from __future__ import annotations

import pytest

from tests.fresh_interpreter import import_all, modules_after


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        # the scaffold and the settings every daemon loads
        (["shared.daemon"], {"pydantic", "pydantic_settings", "shared.spec", "rich", "click"}),
        # agentd, with what it imports to start (the launcher and the runtime)
        (
            ["daemons.agentd.main", "daemons.agentd.launcher"],
            # ctypes with the first root file system, importlib.metadata with the first
            # WebAssembly replica
            {
                "pydantic",
                "shared.spec",
                "aiohttp",
                "yaml",
                "croniter",
                "ctypes",
                "importlib.metadata",
            },
        ),
        # overlayd: cryptography (X25519) with the mesh's first key, gRPC never
        (
            ["daemons.overlayd.main", "daemons.overlayd.mesh"],
            {"pydantic", "shared.spec", "yaml", "croniter", "cryptography", "grpc"},
        ),
        # proxyd reads its certificates with its first TLS listener
        (["daemons.proxyd.main"], {"pydantic", "shared.spec", "yaml", "croniter", "cryptography"}),
        # apid: gRPC (another node's replicas) with the first call to another node
        (
            ["daemons.apid.main", "daemons.apid.app", "daemons.apid.routes_workloads"],
            {"pydantic", "shared.spec", "grpc", "aetcd", "tarfile"},
        ),
        # registryd: aiohttp and yarl are bound lazily (they run with the first pull or push),
        # the gzip inflater comes with the first gzip layer
        (
            ["daemons.registryd.main"],
            {
                "aiohttp.client",
                "yarl._url",
                "pydantic",
                "shared.spec",
                "shared.buildfile",
                "yaml",
                "croniter",
                "isal",
            },
        ),
        # schedd validates specs, with the first deploy; croniter with the first cron job
        # and loads the cluster's code (gRPC, etcd's client, the PKI) only in a cluster or
        # with the first node command
        (
            ["daemons.schedd.main"],
            {"pydantic", "shared.spec", "yaml", "croniter", "grpc", "aetcd", "cryptography"},
        ),
    ],
    ids=lambda value: "+".join(value) if isinstance(value, list) else None,
)
def test_idle_daemon_does_not_import(modules: list[str], absent: set[str]) -> None:
    loaded = modules_after(import_all(*modules))
    assert set(modules) <= loaded
    assert sorted(absent & loaded) == []
