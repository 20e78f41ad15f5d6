"""The REST API fuzzed against its own OpenAPI document (schemathesis), on the real daemons.

Every operation of ``/api/v1/openapi.json`` gets generated requests, paths,
queries and bodies included; each reply must be no 5xx and must conform to
the document (its status, content type, headers and body schema). apid runs
with ``auth = "none"``: who may call what is the auth tests' subject. Streams
are asked for their JSON form (``follow`` dropped), so each request ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks

from daemons.apid.routes_images import check_registry_host
from tests.e2e.conftest import running_node
from tests.integration.test_apid_routes import SPEC, Api, apid_port, follow

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running containers needs root")

# bounded: about 40 operations, so the whole module stays near a minute
EXAMPLES = 8
# operations that reach a registry outside the node: a generated host name that does not
# resolve is a 503 the daemon rightly answers, so only conformance is checked for them
LOGIN = "POST /api/v1/registry/login"
OUTSIDE = {
    LOGIN,
    "POST /api/v1/images/pull",
    "POST /api/v1/images/push",
    "POST /api/v1/build",
}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The six daemons, apid serving every caller as the admin "local", one deployment running
    (so routes on a deployment that exists are reached too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZLAYER_APID_AUTH", "none")
        with running_node(Path(f"/tmp/zls-{os.getpid()}"), tmp_path_factory) as node:
            api = Api(apid_port(node))
            spec = {"spec": SPEC.format(name="app", replicas=1)}
            deployed = api.json("POST", "/api/v1/deployments", spec, 202)
            # its replica exists before any test's leak check looks
            assert follow(api, f"/api/v1/operations/scheduler/{deployed['job']}")[-1][0] == "done"
            try:
                yield api
            finally:
                for deployment in api.json("GET", "/api/v1/deployments"):
                    node.ctl("down", deployment["name"])


@schemathesis.serializer("application/x-tar", "application/gzip")
def tar_body(_context: Any, value: Any) -> bytes:
    """A build context as sent: generated text or bytes (not a tar: the route must say so)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return str(value).encode()


def fuzz(operation: Any, base_url: str) -> str | None:
    """Generated requests to one operation, checked; the failure's text, or None."""
    wanted = CHECKS[1:] if operation.label in OUTSIDE else CHECKS

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        if case.query:
            case.query.pop("follow", None)  # a stream never ends by itself
        case.headers = {**(case.headers or {}), "Accept": "application/json"}
        response = case.call_and_validate(base_url=base_url, checks=wanted, timeout=60)
        if operation.label == LOGIN and response.status_code >= 500:
            # only a host it could reach may fail there; anything else is a 400 first
            registry = case.body.get("registry") if isinstance(case.body, dict) else None
            assert isinstance(registry, str), (response.status_code, case.body)
            check_registry_host(registry)

    try:
        run()
    except Exception as exc:  # every failing operation is reported, not only the first
        return f"{operation.label}: {str(exc)[:2000]}"
    return None


def test_every_operation_conforms_to_the_document_and_never_fails_5xx(live_api: Api) -> None:
    base_url = f"http://127.0.0.1:{live_api.port}"
    document = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")
    operations = [result.ok() for result in document.get_all_operations()]
    assert len(operations) >= 30, [o.label for o in operations]
    failures = [found for o in operations if (found := fuzz(o, base_url)) is not None]
    assert not failures, f"{len(failures)} operations failed:\n\n" + "\n\n".join(failures)
