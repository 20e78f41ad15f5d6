"""zlayer-proxyd starting on saved routes that a crash (or anything else) made unreadable.

proxyd's saved routes are a cache of schedd's view: a file that cannot be
used is moved aside and logged, proxyd starts with the rest, and the next
push (schedd sends its complete view whenever a daemon starts) restores it.
"""

from __future__ import annotations

import pytest

from tests.integration.test_proxyd import (  # noqa: F401 (fixtures)
    Backends,
    Proxyd,
    _plain_get,
    backends,
    proxyd,
    run,
    service,
    state_dir,
)


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong schema"])
def test_an_unreadable_saved_route_is_moved_aside_and_the_next_push_restores_it(
    proxyd: Proxyd,  # noqa: F811
    backends: Backends,  # noqa: F811
    how: str,
) -> None:
    web = service("web", [proxyd.http(backends.port, host="web.test")], ["127.0.0.2"])
    proxyd.start()
    proxyd.push("demo", [web])
    proxyd.push(
        "other",
        [service("api", [proxyd.http(backends.port, host="api.test")], ["127.0.0.3"], "other")],
    )
    proxyd.stop()

    saved = state_dir(proxyd.paths) / "traffic" / "demo.json"
    text = saved.read_bytes()
    damaged = {
        "truncated": text[: len(text) // 2],
        "garbage": b"\x00\xff\x13 not json",
        "wrong schema": b'{"deployment": "demo", "services": {"web": 1}}',
    }[how]
    saved.write_bytes(damaged)

    proxyd.start()  # it starts, with what it could read
    assert [r.service for r in proxyd.routes()] == ["api"]
    assert run(lambda: _plain_get(proxyd, "api.test")) == 200
    assert run(lambda: _plain_get(proxyd, "web.test")) == 404
    # schedd's next view brings the route back, and it is saved whole again.
    proxyd.push("demo", [web])
    assert run(lambda: _plain_get(proxyd, "web.test")) == 200
    proxyd.stop()

    (aside,) = saved.parent.glob("demo.json.corrupt-*")
    assert aside.read_bytes() == damaged
    assert f"{saved} cannot be used" in proxyd.logs and f"moved it to {aside}" in proxyd.logs
    seen = len(proxyd.logs)
    proxyd.start()
    assert sorted(r.service for r in proxyd.routes()) == ["api", "web"]
    proxyd.stop()
    assert "cannot be used" not in proxyd.logs[seen:]
