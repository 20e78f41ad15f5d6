"""The .rpm, built here with rpmbuild from packaging/rpm/zlayer-node.spec.

Without an rpm-based machine to install it on, this checks what can be checked
here: the spec builds, the package holds the same commands, units, bus policy
and environment as the .deb (both come from packaging/stage.sh), its scripts
stop the deployments on removal only, and the environment inside it runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ctl.main import LAZY_COMMANDS
from tests.packaging.builds import Build

DAEMONS = ("schedd", "agentd", "registryd", "overlayd", "proxyd", "apid")

pytestmark = pytest.mark.skipif(
    shutil.which("rpmbuild") is None or shutil.which("rpm2cpio") is None,
    reason="needs rpmbuild (apt-get install rpm)",
)


def rpm_query(package: Path, *args: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", *args, str(package)], capture_output=True, text=True, check=True
    ).stdout


def test_the_rpm_holds_what_the_deb_holds(tmp_path: Path, rpm_build: Build) -> None:
    # Built by packaging/build-rpm.sh with ZLAYER_RPM_NODEPS=1, started with the first
    # packaging test (the packaging conftest).
    built = rpm_build.wait()
    assert built.returncode == 0, built.stderr
    package = Path(built.stdout.strip().splitlines()[-1])
    assert package.name.startswith("zlayer-node-") and package.suffix == ".rpm"

    files = set(rpm_query(package, "-l").split())
    for name in ("zlayerctl", *(f"zlayer-{d}" for d in DAEMONS)):
        assert f"/usr/bin/{name}" in files and f"/opt/zlayer/bin/{name}" in files
        if name != "zlayerctl":
            assert f"/usr/lib/systemd/system/{name}.service" in files
    assert "/usr/lib/systemd/system/zlayer.target" in files
    assert "/usr/share/dbus-1/system.d/org.zlayer.conf" in files
    assert "/opt/zlayer/libexec/stop-deployments" in files
    # shell completions where Fedora's shells look, a man page per command
    assert "/usr/share/bash-completion/completions/zlayerctl" in files
    assert "/usr/share/zsh/site-functions/_zlayerctl" in files
    assert "/usr/share/fish/vendor_completions.d/zlayerctl.fish" in files
    for name in ("zlayerctl", *(f"zlayerctl-{command}" for command in LAZY_COMMANDS)):
        assert f"/usr/share/man/man1/{name}.1.gz" in files

    requires = rpm_query(package, "--requires")
    for needed in ("(crun or runc)", "conmon", "dbus", "nftables", "python3 >= 3.11"):
        assert needed in requires
    scripts = rpm_query(package, "--scripts")
    preun = scripts.split("preuninstall scriptlet")[1].split("postuninstall")[0]
    assert 'if [ "$1" -eq 0 ]; then' in preun and "/opt/zlayer/libexec/stop-deployments" in preun

    # The environment inside runs: unpack it and ask zlayerctl for its help.
    unpacked = tmp_path / "root"
    unpacked.mkdir()
    cpio = subprocess.run(
        f"rpm2cpio {package} | cpio -idm --quiet", shell=True, cwd=unpacked, check=False
    )
    assert cpio.returncode == 0
    env_python = unpacked / "opt" / "zlayer" / "bin" / "python"
    assert os.readlink(env_python.parent / "python3") == "/usr/bin/python3"
    shebang = (unpacked / "opt" / "zlayer" / "bin" / "zlayerctl").read_text().splitlines()[0]
    assert shebang == "#!/opt/zlayer/bin/python3"
    site = next((unpacked / "opt" / "zlayer" / "lib").glob("python3*/site-packages"))
    helped = subprocess.run(
        ["/usr/bin/python3", "-c", "from ctl.main import main; main()", "--help"],
        capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert helped.returncode == 0 and "zlayerctl" in helped.stdout, helped.stderr
