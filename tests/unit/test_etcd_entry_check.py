"""``python -m shared.cluster.etcd check``, zlayer-etcd.service's ExecCondition: systemd
skips the unit quietly when it exits 1 to 254, so a broken cluster.toml must not end it
with one of those (the member would silently not run): it exits 255, which fails the
unit with the file's sentence in its log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.cluster import config
from shared.paths import PREFIX_ENV, Paths


def check(prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cluster.etcd", "check"],
        env={PREFIX_ENV: str(prefix), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_broken_cluster_toml_fails_the_condition_instead_of_skipping(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    config.path_of(paths).write_text('node_id = "x"\n')
    done = check(tmp_path)
    assert done.returncode == 255, done
    assert "not a cluster configuration" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
