"""agentd's compile cache does not grow for ever: at start it removes compiles cut short
and compiled modules nobody started from in a week, but never one a bundle names."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemons.agentd.wasm import CACHE_KEEP_SECONDS, cache_dir, prune_cache


def test_partial_and_stale_entries_go_and_used_or_named_ones_stay(tmp_path: Path) -> None:
    cache = cache_dir(tmp_path)
    cache.mkdir(parents=True)
    tools = tmp_path / "wasm" / "bin"
    tools.mkdir()
    now = time.time()
    old = now - CACHE_KEEP_SECONDS - 60

    fresh = cache / "fresh.cwasm"
    stale = cache / "stale.cwasm"
    named = cache / "named.cwasm"
    cut_short = cache / "k.123.partial"
    copy_cut_short = tools / "wasmtime-49.0.4.77.partial"
    for path in (fresh, stale, named, cut_short, copy_cut_short):
        path.write_bytes(b"x")
    for path in (stale, named):
        os.utime(path, (old, old))
    bundle = tmp_path / "bundles" / "app-web-1-r1"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(f'{{"mounts": [{{"source": "{named}"}}]}}')

    removed = prune_cache(tmp_path, now)

    assert sorted(removed) == sorted([stale, cut_short, copy_cut_short])
    assert fresh.exists() and named.exists() and not stale.exists()


def test_nothing_to_prune_on_a_node_without_wasm(tmp_path: Path) -> None:
    assert prune_cache(tmp_path) == []
