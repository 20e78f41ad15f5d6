"""The node key under systemd, from the .deb on a booted Debian 12 (systemd-nspawn).

The package makes the key once, encrypted by systemd-creds (this machine has no
TPM: the host's credential secret), and apid and schedd start with it loaded
as their credential ``node-key``; a credential that no longer decrypts stops
apid's start with systemd's reason and no other key is used; restored, apid
comes back on its own.
"""

from __future__ import annotations

import json

import pytest

from tests.packaging.machine import Machine
from tests.packaging.test_deb import deb, machine, pytestmark, wait_until  # noqa: F401

CREDENTIAL = "/var/lib/zlayer/node-key.cred"
SECRET = "/var/lib/systemd/credential.secret"


def _active(box: Machine, unit: str) -> str:
    return box.run("systemctl", "is-active", unit, check=False).stdout.strip()


def _loaded_key(box: Machine, unit: str) -> str:
    """The sha256 of the node key systemd handed ``unit`` (32 bytes, or the test fails)."""
    path = f"/run/credentials/{unit}/node-key"
    size = box.run("stat", "-c", "%s", path).stdout.strip()
    assert size == "32", f"{unit}'s node-key credential is {size} bytes"
    return box.run("sha256sum", path).stdout.split()[0]


@pytest.mark.timeout(900)
def test_apid_and_schedd_run_with_the_encrypted_node_key(machine: Machine) -> None:  # noqa: F811
    machine.run("dpkg", "-i", "/var/tmp/zlayer-node.deb")
    machine.run("test", "-s", CREDENTIAL)
    # encrypted: the key is in clear nowhere on disk
    assert machine.run("test", "-e", "/var/lib/zlayer/node.key", check=False).returncode != 0
    for unit in ("zlayer-apid.service", "zlayer-schedd.service"):

        def active(unit: str = unit) -> bool:
            return _active(machine, unit) == "active"

        wait_until(f"{unit} active", active, 60)
    assert _loaded_key(machine, "zlayer-apid.service") == _loaded_key(
        machine, "zlayer-schedd.service"
    )

    # apid signs with it: a token made over the bus opens the API; none does not
    made = machine.run("zlayerctl", "token", "create", "ops", "--role=viewer", "--format=json")
    token = json.loads(made.stdout)["token"]
    url = "http://127.0.0.1:3669/api/v1/deployments"
    with_token = machine.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
        f"Authorization: Bearer {token}", url,
    )  # fmt: skip
    assert with_token.stdout == "200"
    without = machine.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url)
    assert without.stdout == "401"

    # The host's credential secret changes (as a new TPM would): the credential no
    # longer decrypts, apid does not start, and systemd says why.
    machine.run("cp", "-a", SECRET, f"{SECRET}.kept")
    try:
        machine.run("sh", "-c", f"chmod 600 {SECRET} && head -c 4096 /dev/urandom > {SECRET}")
        since = machine.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
        assert machine.run("systemctl", "restart", "zlayer-apid", check=False).returncode != 0
        said = machine.run(
            "journalctl", "--no-pager", "-q", "-u", "zlayer-apid", "--since", since
        ).stdout
        assert "credential" in said.lower(), said
        assert "243/CREDENTIALS" in said, said
    finally:
        machine.run("mv", f"{SECRET}.kept", SECRET)
    # restored: systemd's next restart brings apid back, with the same key and tokens
    wait_until("apid back", lambda: _active(machine, "zlayer-apid.service") == "active", 60)
    again = machine.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
        f"Authorization: Bearer {token}", url,
    )  # fmt: skip
    assert again.stdout == "200"

    # Where systemd-creds cannot encrypt, the package leaves the clear 0600 file and
    # the units' fallback credential, "none", sends the daemon to it: the same key.
    machine.run(
        "sh", "-c",
        f"systemd-creds decrypt --name=node-key {CREDENTIAL} /var/lib/zlayer/node.key"
        f" && chmod 600 /var/lib/zlayer/node.key && rm {CREDENTIAL}",
    )  # fmt: skip
    machine.run("systemctl", "restart", "zlayer-apid")
    fallback = machine.run("cat", "/run/credentials/zlayer-apid.service/node-key").stdout
    assert fallback == "none"
    from_file = machine.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
        f"Authorization: Bearer {token}", url,
    )  # fmt: skip
    assert from_file.stdout == "200"
