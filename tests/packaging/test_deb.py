"""The .deb as a user gets it: built by packaging/build-deb.sh, installed with dpkg on a
fresh Debian 12 booted with its own systemd (systemd-nspawn), and used.

What this proves that nothing else does: the units start the daemons under a real
systemd with their sandboxing (Type=notify, watchdog, the capability bounding sets,
ProtectHome=, PrivateTmp=), the D-Bus policy lets them own their names on the real
system bus, a daemon killed by PID is restarted by systemd, the main job (an image
import from a directory registryd cannot see, three replicas, the proxy) works under
them, overlayd's service DNS refuses no query while systemd restarts it (the file
descriptor store), five restarts of zlayer.target in a row end healthy, a daemon
that fails for good shows in zlayer.target, apid and schedd get the node key as an
encrypted credential, node init runs the cluster's etcd member as zlayer-etcd.service
(etcd-server installed beside the package), and removing the package stops everything
and purging leaves no state.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl.main import LAZY_COMMANDS
from tests.conftest import _snapshot
from tests.packaging.builds import Build
from tests.packaging.machine import MACHINE_ENV, Machine, nspawn_cgroups, remove_cgroup_tree

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("schedd", "agentd", "registryd", "overlayd", "proxyd", "apid")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CLUSTER_NODE_CGROUP = re.compile(r"zlayer-c\d+x\d+(-n\d+)?")
CACHE = Path("/var/cache/zlayer-tests/debootstrap")  # packages kept between local runs
# What removal must leave as it found it: the machine's network, before the first install.
HOST_STATE = (
    "cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/all/route_localnet; "
    "ls /sys/class/net; nft list tables"
)
BEFORE_INSTALL: dict[str, str] = {}
LAN = "192.168.77.10"  # the machine's address on its network card

pytestmark = [
    # The first test's setup bootstraps and boots the machine while the .deb builds.
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a machine needs root"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("debootstrap", "systemd-nspawn", "dpkg-deb")),
        reason="needs debootstrap, systemd-container and dpkg (scripts/apt-deps.sh test)",
    ),
]


@pytest.fixture(scope="module")
def deb_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    """packaging/build-deb.sh, started: it runs while the machine is made and booted."""
    build = Build("build-deb.sh", tmp_path_factory.mktemp("dist"), ZLAYER_DEB_COMPRESSION="gzip")
    yield build
    build.stop()


@pytest.fixture(scope="module")
def deb(deb_build: Build) -> Path:
    return deb_build.package()


@pytest.fixture(scope="module")
def machine(deb_build: Build) -> Iterator[Machine]:
    before = _snapshot()
    cgroups_before = nspawn_cgroups()
    machine = None
    try:
        machine = Machine.create(CACHE)  # while the .deb builds
        shutil.copy(deb_build.package(), machine.root / "var" / "tmp" / "zlayer-node.deb")
        # Forwarding off, as on a fresh host: the package turns it on, removal turns it off.
        machine.run("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
        # A network card with an address, as a server has (the machine's own network is
        # its loopback alone): what node init advertises to other nodes. A veth pair, as
        # this kernel has no dummy devices.
        machine.run(
            "sh", "-c",
            "ip link add lan0 type veth peer name lan0peer && ip link set lan0peer up && "
            f"ip addr add {LAN}/24 dev lan0 && ip link set lan0 up",
        )  # fmt: skip
        BEFORE_INSTALL["host"] = machine.run("sh", "-c", HOST_STATE).stdout
        yield machine
    finally:
        if machine is not None:
            machine.stop()
        for top in nspawn_cgroups() - cgroups_before:
            remove_cgroup_tree(top)
        # The v1 hierarchies nspawn shares with the machine (cpuset, freezer, ...) keep
        # the empty zlayer.slice its replicas were in: the machine's, not a leak of ours.
        # Only empty ones go (rmdir): one that still holds a process is a leak, reported.
        for path in sorted(_snapshot()["cgroups"] - before["cgroups"], reverse=True):
            if _the_machines("cgroups", path):
                with contextlib.suppress(OSError):
                    Path(path).rmdir()
        after = _snapshot()
        # a parent of a cluster test node's cgroups (systemd's zlayer.slice) is theirs too
        holders = {str(p) for c in after["cgroups"] if _a_cluster_nodes(c) for p in Path(c).parents}
        leaks = {
            kind: sorted(
                item
                for item in after[kind] - before.get(kind, set()) - holders
                if _the_machines(kind, item)
            )
            for kind in after
        }
        leaks = {kind: items for kind, items in leaks.items() if items}
        assert not leaks, f"the machine left these behind: {leaks}"


def _the_machines(kind: str, item: str) -> bool:
    """Whether a new mount or cgroup on the host can be the machine's: what debootstrap
    mounted under its root, and the cgroups of the v1 hierarchies it shares (nspawn's
    payload, and the machine's zlayer.slice at their root). Its links, network
    namespaces and nft tables are in its own namespaces (a private network), so the
    host's are another test's, running beside this module (scripts/test.sh runs the
    cluster tests meanwhile), and left alone."""
    if kind == "mounts":
        return item.startswith(f"{tempfile.gettempdir()}/zlmachine-")
    if kind == "cgroups":
        parts = Path(item).relative_to(CGROUP_ROOT).parts
        mine = len(parts) >= 2 and parts[1] in ("zlayer.slice", "payload")
        return mine and not _a_cluster_nodes(item)
    return False


def _a_cluster_nodes(cgroup: str) -> bool:
    """Whether ``cgroup`` is in a cluster test node's cgroups: its replicas are under a
    parent of its own, zlayer-c<tag>-n<k> (inside zlayer.slice where systemd manages
    cgroups), never the machine's."""
    parts = Path(cgroup).parts
    return any(CLUSTER_NODE_CGROUP.fullmatch(part.removesuffix(".slice")) for part in parts)


def status(machine: Machine) -> dict[str, dict[str, object]]:
    out = machine.run("zlayerctl", "status", "--format", "json", check=False).stdout
    return {d["name"]: d for d in json.loads(out or "[]")}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:.0f}s")
        time.sleep(0.2)


def test_installed_daemons_run_under_systemd_and_come_back(machine: Machine) -> None:
    machine.run("dpkg", "-i", "/var/tmp/zlayer-node.deb")
    assert machine.run("systemctl", "is-active", "zlayer.target").stdout.strip() == "active"
    # Bytecode made at install: neither the sandboxed daemons nor other users can write it.
    compiled = machine.run(
        "find", "/opt/zlayer/lib", "-path", "*/ctl/__pycache__/main.*.pyc"
    ).stdout
    assert compiled.strip(), "zlayerctl's modules were not byte-compiled at install"
    # The -OO daemons' bytecode, of ZLayer and of the standard library, in the package's
    # cache; none written beside the distribution's own files.
    cache = "/var/cache/zlayer/python"
    for pattern in (
        "*/shared/daemon.*.opt-2.pyc",
        "*/asyncio/events.*.opt-2.pyc",
    ):
        found = machine.run("find", cache, "-path", pattern).stdout
        assert found.strip(), f"no {pattern} in {cache}"
    stray = machine.run("find", "/usr/lib", "-name", "*.opt-2.pyc").stdout
    assert stray == "", f"-OO bytecode beside the distribution's files: {stray}"
    assert machine.run("systemctl", "is-enabled", "zlayer.target").stdout.strip() == "enabled"

    def six_running() -> bool:
        daemons = status(machine)
        return len(daemons) == 6 and all(d["state"] == "running" for d in daemons.values())

    try:
        wait_until("six running daemons", six_running)
    except AssertionError:
        said = machine.run("zlayerctl", "status", check=False)
        units = machine.run("systemctl", "--no-pager", "status", "zlayer-*", check=False)
        raise AssertionError(f"{said.stdout}{said.stderr}\n{units.stdout}") from None
    daemons = status(machine)
    assert sorted(daemons) == sorted(DAEMONS)
    assert {d["supervisor"] for d in daemons.values()} == {"systemd"}
    # Each name on the real system bus, each metrics port answering.
    tree = machine.run("busctl", "--no-pager", "list").stdout
    assert all(f"org.zlayer.{n}1" in tree for n in ("Scheduler", "Agent", "Registry"))
    for port in range(9301, 9307):
        metrics = machine.run("curl", "-sf", f"http://127.0.0.1:{port}/metrics").stdout
        assert "zlayer_build_info" in metrics
    # The five -OO daemons run so (shared.daemon.OPTIMIZED_DAEMONS), apid does not.
    for name, row in daemons.items():
        environ = machine.run("cat", f"/proc/{row['pid']}/environ").stdout.split("\0")
        assert ("PYTHONOPTIMIZE=2" in environ) == (name != "apid"), name
    stray = machine.run("find", "/usr/lib", "/opt/zlayer", "-name", "*.opt-2.pyc").stdout
    assert stray == "", f"the daemons wrote -OO bytecode beside the sources: {stray}"
    # Nothing logged at warning or worse while starting.
    warnings = machine.run(
        "journalctl", "--no-pager", "-q", "-p", "warning", "-u", "zlayer-*"
    ).stdout.strip()
    assert warnings == "", warnings

    # Killed by PID, restarted by systemd (Restart=on-failure).
    old = int(str(daemons["agentd"]["pid"]))
    machine.run("sh", "-c", f"kill -9 {old}")
    wait_until(
        "agentd restarted",
        lambda: (
            status(machine)["agentd"]["state"] == "running"
            and status(machine)["agentd"]["pid"] not in (old, None)
        ),
        timeout=45,
    )


# ---------------------------------------------------------------- the node key
# The package makes it once, encrypted by systemd-creds (this machine has no TPM:
# the host's credential secret), and apid and schedd start with it loaded as their
# credential node-key; one that no longer decrypts stops apid's start with systemd's
# reason and no other key is used; restored, apid comes back on its own; where the
# package could only write the clear key file, the units' fallback sends them to it.

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


def test_apid_and_schedd_run_with_the_encrypted_node_key(machine: Machine) -> None:
    if machine.run("dpkg-query", "-W", "zlayer-node", check=False).returncode != 0:
        machine.run("dpkg", "-i", "/var/tmp/zlayer-node.deb")  # run alone (-k)
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


def test_the_main_job_under_the_packaged_units(machine: Machine) -> None:
    """The README's deployment: three httpd replicas, the proxy in front of them."""
    machine.run("mkdir", "-p", "/root/app")
    shutil.copy(REPO / "examples" / "static-web.zlayer.yml", machine.root / "root" / "app")
    # /root is hidden from registryd (ProtectHome=): zlayerctl sends the image to it.
    machine.run("/opt/zlayer/bin/python", "-m", "shared.busybox_image", "/root/image")
    machine.run("zlayerctl", "image", "import", "/root/image/oci", "--name", "zlayer/busybox")
    assert machine.run("ls", "/var/lib/zlayer/registryd/received").stdout == ""

    up = machine.run("zlayerctl", "up", "-d", "--timeout", "120", cwd="/root/app", timeout=200)
    assert up.returncode == 0
    ps = json.loads(
        machine.run("zlayerctl", "ps", "--containers", "--format", "json", cwd="/root/app").stdout
    )
    running = [r for r in ps if r["health"] == "healthy"]
    assert len(running) == 3, ps
    check_limits_with_replicas(machine, [int(r["pid"]) for r in running])
    address = running[0]["address"].split("/")[0]
    page = machine.run("curl", "-sf", f"http://{address}:8080/").stdout
    assert page
    wait_until(
        "the proxy serving the page",
        lambda: machine.run("curl", "-sf", "http://127.0.0.1/", check=False).stdout == page,
    )
    machine.run("zlayerctl", "down", cwd="/root/app", timeout=120)
    assert machine.run("zlayerctl", "ps", "--format", "json").stdout.strip() == "[]"


# ---------------------------------------------------------------- the REST API
# Driven from inside the machine with the package's own Python (aiohttp is in its
# venv), against apid under its unit: no capabilities, PrivateUsers=, ProtectSystem=.

API_SPEC = """\
version: v1
deployment: apiweb
services:
  web:
    image: zlayer/busybox
    env: {GREETING: $S:greet}
    command: {entrypoint: [sh, -c], args: ['echo api-hello; exec sleep 3600']}
    scale: {mode: fixed, replicas: 1}
"""

# Walks the API as a client does; prints one JSON object of what each route answered.
API_WALK = """\
import asyncio, json, sys, time
import aiohttp

TOKEN, SPEC = sys.argv[1], open(sys.argv[2]).read()
BASE = "http://127.0.0.1:3669"
AUTH = {"Authorization": "Bearer " + TOKEN}
SVC = "/api/v1/deployments/apiweb/services/web"
out = {}


async def main():
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def call(method, path, **kw):
            async with s.request(method, BASE + path, **kw) as r:
                body = await r.read()
                try:
                    return r.status, json.loads(body)
                except ValueError:
                    return r.status, body.decode(errors="replace")

        async def follow(location):
            deadline = time.monotonic() + 120
            while True:
                _, info = await call("GET", location)
                if info.get("state") != "running" or time.monotonic() > deadline:
                    return info
                await asyncio.sleep(0.3)

        out["list"] = await call("GET", "/api/v1/deployments")
        out["secret"] = (await call("POST", "/api/v1/secrets",
                                    json={"name": "greet", "value": "s3cret-value"}))[0]
        status, deployed = await call("POST", "/api/v1/deployments", data=SPEC,
                                      headers={"Content-Type": "application/yaml"})
        out["deploy"] = [status, deployed]
        out["deploy_done"] = (await follow(f"/api/v1/operations/scheduler/{deployed['job']}")
                              if status == 202 else None)
        deadline = time.monotonic() + 30
        while True:
            async with s.get(BASE + SVC + "/logs") as r:  # NDJSON: one object a line
                text = await r.text()
            lines = [json.loads(line) for line in text.splitlines()] if r.status == 200 else []
            out["logs"] = [r.status, lines if r.status == 200 else text]
            if lines or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        out["exec"] = await call("POST", SVC + "/exec", json={"command": ["echo", "hi"]})
        shown = ["sh", "-c", "echo $GREETING"]  # the image has no printenv
        out["env"] = await call("POST", SVC + "/exec", json={"command": shown})
        # a command on a terminal (tty=1); no prompt to race with
        ws_url = (BASE.replace("http", "ws") + SVC + "/exec/ws?command=sh&command=-c"
                  "&command=tty%3B+echo+%24((6*7))%3B+exit+5&tty=1")
        got, final = b"", None
        try:
            async with s.ws_connect(ws_url) as ws:
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        got += message.data
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        final = json.loads(message.data)
                        break
                    else:
                        break
        except aiohttp.ClientError as exc:
            final = repr(exc)
        out["ws"] = [got.decode(errors="replace"), final]
        status, document = await call("GET", "/api/v1/openapi.json")
        out["openapi"] = [status, sorted(document.get("paths", {})) if status == 200 else document]
        out["docs"] = await call("GET", "/api/v1/docs")
        async with aiohttp.ClientSession() as bare:  # the page and its assets need no token
            async with bare.get(BASE + "/api/v1/docs/swagger-ui-bundle.js") as r:
                out["docs_js"] = [r.status, len(await r.read())]
        status, removed = await call("DELETE", "/api/v1/deployments/apiweb")
        out["delete"] = [status, removed]
        out["delete_done"] = (await follow(f"/api/v1/operations/scheduler/{removed['id']}")
                              if status == 202 else None)
        out["after"] = await call("GET", "/api/v1/deployments/apiweb")
        out["secret_rm"] = (await call("DELETE", "/api/v1/secrets/greet"))[0]


asyncio.run(main())
print(json.dumps(out))
"""


def test_the_rest_api_under_the_packaged_apid(machine: Machine) -> None:
    """A root-made token drives the API end to end under apid's sandbox: deploy and its
    operation, logs (replica log files read with no capability), exec and its
    WebSocket, a secret as $S:, the OpenAPI document and its page from the package,
    delete; and zlayerctl --host works for a user who has no access to the bus."""
    if machine.run("dpkg-query", "-W", "zlayer-node", check=False).returncode != 0:
        machine.run("dpkg", "-i", "/var/tmp/zlayer-node.deb")  # run alone (-k)
    if "zlayer/busybox" not in machine.run("zlayerctl", "image", "ls").stdout:
        machine.run("/opt/zlayer/bin/python", "-m", "shared.busybox_image", "/root/image")
        machine.run("zlayerctl", "image", "import", "/root/image/oci", "--name", "zlayer/busybox")
    wait_until("apid active", lambda: is_active(machine, "zlayer-apid") == "active", 60)
    made = machine.run("zlayerctl", "token", "create", "walk", "--role=admin", "--format=json")
    token = json.loads(made.stdout)["token"]
    (machine.root / "root" / "api.yml").write_text(API_SPEC)
    (machine.root / "root" / "apiwalk.py").write_text(API_WALK)
    try:
        walked = machine.run(
            "/opt/zlayer/bin/python", "/root/apiwalk.py", token, "/root/api.yml", timeout=400
        )
        seen = json.loads(walked.stdout)
        assert seen["list"][0] == 200 and isinstance(seen["list"][1], list), seen["list"]
        assert seen["secret"] in (200, 201), seen
        assert seen["deploy"][0] == 202, seen["deploy"]
        assert seen["deploy_done"]["state"] == "done", seen["deploy_done"]
        assert seen["logs"][0] == 200, seen["logs"]
        assert [line["line"] for line in seen["logs"][1]] == ["api-hello"], seen["logs"]
        assert seen["exec"] == [200, {"exit_code": 0, "stdout": "hi\n", "stderr": ""}], seen
        assert seen["env"][1]["stdout"] == "s3cret-value\n", seen["env"]
        assert seen["ws"][0].startswith("/dev/pts/"), seen["ws"]  # on a terminal
        assert "\r\n42\r\n" in seen["ws"][0] and seen["ws"][1] == {"exit_code": 5}, seen["ws"]
        assert seen["openapi"][0] == 200 and "/api/v1/deployments" in seen["openapi"][1]
        assert seen["docs"][0] == 200 and "swagger-ui-bundle.js" in seen["docs"][1]
        assert seen["docs_js"][0] == 200 and seen["docs_js"][1] > 100_000, seen["docs_js"]
        assert seen["delete"][0] == 202, seen["delete"]
        assert seen["delete_done"]["state"] == "done", seen["delete_done"]
        assert seen["after"][0] == 404, seen["after"]
        assert seen["secret_rm"] in (200, 204), seen
        # The secret's value is in no journal line of apid or schedd.
        journal = machine.run(
            "journalctl", "--no-pager", "-q", "-u", "zlayer-apid", "-u", "zlayer-schedd"
        ).stdout
        assert "s3cret-value" not in journal

        # Remote mode as a user with no bus access: only the token and the URL.
        machine.run("sh", "-c", "printf s3cret-value | zlayerctl secret set greet")
        machine.run("zlayerctl", "up", "-b", "/root/api.yml")
        remote = machine.run(
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
            f"ZLAYER_TOKEN={token}", "HOME=/tmp", "zlayerctl", "--host",
            "http://127.0.0.1:3669", "ps", check=False,
        )  # fmt: skip
        assert remote.returncode == 0, remote.stderr
        assert "apiweb" in remote.stdout, remote.stdout
        bus_direct = machine.run(
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
            "HOME=/tmp", "zlayerctl", "ps", check=False,
        )  # fmt: skip
        print(f"\nremote ps: {remote.stdout!r}; without --host: {bus_direct.stderr.strip()!r}")
    finally:
        machine.run("zlayerctl", "down", "apiweb", timeout=120, check=False)
        machine.run("zlayerctl", "secret", "rm", "greet", check=False)
        machine.run("zlayerctl", "token", "revoke", "walk", check=False)


def check_limits_with_replicas(machine: Machine, replica_pids: list[int]) -> None:
    """The units' memory, task and open file limits are in force, and the replicas
    count against none of them: each is in its own scope, not in agentd's cgroup."""
    agentd_cgroup = machine.run(
        "systemctl", "show", "-P", "ControlGroup", "zlayer-agentd.service"
    ).stdout.strip()
    assert agentd_cgroup.endswith("/zlayer-agentd.service"), agentd_cgroup
    for pid in replica_pids:
        cgroups = machine.run("cat", f"/proc/{pid}/cgroup").stdout
        assert "zlayer-agentd.service" not in cgroups, f"replica {pid} is in agentd's cgroup"
    keys = ("MemoryHigh", "MemoryMax", "TasksMax", "LimitNOFILE", "MemoryCurrent", "TasksCurrent")
    for name in DAEMONS:
        shown = machine.run(
            "systemctl", "show", *(f"-p{k}" for k in keys), f"zlayer-{name}.service"
        ).stdout
        props = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        # agentd has a task limit only: its cgroup holds every replica's conmon.
        limits = ("TasksMax",) if name == "agentd" else ("MemoryHigh", "MemoryMax", "TasksMax")
        for key in limits:
            assert props[key] != "infinity", f"zlayer-{name}: {key} is not in force: {props}"
        if name in ("proxyd", "overlayd"):
            assert props["LimitNOFILE"] == "65536", props
        # The figures busy (three replicas up, the proxy routing), for the units' comments.
        memory = props["MemoryCurrent"]
        memory = f"{int(memory) >> 20} MiB" if memory.isdigit() else memory
        print(f"\nzlayer-{name}: memory {memory}, tasks {props['TasksCurrent']}")


def test_a_build_under_the_packaged_registryd(machine: Machine) -> None:
    """buildah inside registryd's sandbox (the loosened bounding set, the mount and UTS
    namespaces, chroot isolation), from a context in /root that registryd cannot see."""
    machine.run("/opt/zlayer/bin/python", "-m", "shared.busybox_image", "/srv/image")
    context = machine.root / "root" / "ctx"
    context.mkdir()
    (context / "hello.txt").write_text("hello from a packaged build\n")
    (context / "Dockerfile").write_text(
        "FROM oci-archive:/srv/image/oci-archive.tar\n"
        "RUN echo built > /built\n"
        "COPY hello.txt /hello.txt\n"
    )
    built = machine.run("zlayerctl", "build", "/root/ctx", "-t", "hello:1", timeout=300)
    assert "in /root/ctx" in built.stdout and "received" not in built.stdout
    assert built.stdout.strip().splitlines()[-1].startswith("built docker.io/library/hello:1: ")
    assert machine.run("ls", "/var/lib/zlayer/registryd/received").stdout == ""
    # The image runs: a job that prints what the build put in it.
    (machine.root / "root" / "ctx" / "job.zlayer.yml").write_text(
        "version: v1\ndeployment: built\nservices:\n  show:\n    rtype: job\n"
        "    image: hello:1\n"
        "    command: {entrypoint: [sh, -c], args: ['cat /built /hello.txt']}\n"
    )
    machine.run("zlayerctl", "up", "-b", "job.zlayer.yml", cwd="/root/ctx")
    ran = machine.run("zlayerctl", "job", "trigger", "show", "-d", "built", "--wait", check=False)
    assert ran.returncode == 0, ran.stderr
    logs = machine.run("zlayerctl", "logs", "-d", "built", "show").stdout
    assert "built" in logs and "hello from a packaged build" in logs
    machine.run("zlayerctl", "down", "built", timeout=120)


RESOLVER = """\
version: v1
deployment: resolver
services:
  web:
    image: zlayer/busybox
    command: {entrypoint: [sleep, "3600"]}
    scale: {mode: fixed, replicas: 1}
"""

# Run inside the machine with the package's Python (dnslib is in its venv): asks
# for web.service.local over UDP and TCP in turn, as a stub resolver does
# (connected sockets, so a closed port is a refusal), until told to stop.
DNS_LOOP = """\
import json, socket, struct, sys, time
from pathlib import Path
from dnslib import QTYPE, DNSRecord

server, out = sys.argv[1], Path(sys.argv[2])
stop, progress = Path(sys.argv[2] + ".stop"), Path(sys.argv[2] + ".count")
results, tcp = [], False
while not stop.exists():
    tcp = not tcp
    asked = time.time()
    query = DNSRecord.question("web.service.local", "A")
    packet = bytes(query.pack())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
            s.settimeout(30)
            s.connect((server, 53))
            if tcp:
                s.sendall(struct.pack("!H", len(packet)) + packet)
                with s.makefile("rb") as f:
                    data = f.read(struct.unpack("!H", f.read(2))[0])
            else:
                s.send(packet)
                data = s.recv(4096)
        reply = DNSRecord.parse(data)
        found = sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)
        outcome = "answer " + " ".join(found)
    except ConnectionRefusedError:
        outcome = "refused"
    except Exception as exc:
        outcome = f"error {exc!r}"
    results.append([asked, "tcp" if tcp else "udp", outcome])
    Path(sys.argv[2] + ".tmp").write_text(str(len(results)))
    Path(sys.argv[2] + ".tmp").replace(progress)  # whole, never half-written
out.write_text(json.dumps(results))
"""


def main_pid(machine: Machine, unit: str) -> int:
    return int(machine.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)


def is_active(machine: Machine, unit: str) -> str:
    return machine.run("systemctl", "is-active", unit, check=False).stdout.strip()


def test_restarts_refuse_no_dns_query_and_end_healthy(machine: Machine) -> None:
    """systemctl restart and kill -9 of overlayd, then five restarts of zlayer.target in
    a row, under a DNS query loop: no query refused, only the one the killed process
    had read may be lost, and the node ends healthy with its replica adopted (five
    target restarts within a minute used to leave all six in start-limit-hit)."""
    (machine.root / "root" / "dns").mkdir()
    (machine.root / "root" / "dns" / "resolver.zlayer.yml").write_text(RESOLVER)
    (machine.root / "root" / "dnsloop.py").write_text(DNS_LOOP)
    machine.run("zlayerctl", "up", "-d", "--timeout", "120", cwd="/root/dns", timeout=200)
    try:
        replicas = json.loads(
            machine.run(
                "zlayerctl", "ps", "--containers", "--format", "json", "-d", "resolver"
            ).stdout
        )
        address = replicas[0]["address"].split("/")[0]
        resolv = machine.run("zlayerctl", "exec", "web", "-d", "resolver", "--", "cat",
                             "/etc/resolv.conf").stdout  # fmt: skip
        server = next(
            line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")
        )
        machine.run("sh", "-c", f"/opt/zlayer/bin/python /root/dnsloop.py {server} /root/dns.json "
                    ">/root/dnsloop.log 2>&1 &")  # fmt: skip
        count = machine.root / "root" / "dns.json.count"

        def answered(more: int) -> Callable[[], bool]:
            start = int(count.read_text()) if count.exists() else 0
            return lambda: count.exists() and int(count.read_text()) >= start + more

        try:
            wait_until("the first answers", answered(5))
            assert machine.run("systemctl", "show", "-p", "NFileDescriptorStore", "--value",
                               "zlayer-overlayd").stdout.strip() == "2"  # fmt: skip
            # A graceful restart, then a crash (Restart=on-failure brings it back).
            old = main_pid(machine, "zlayer-overlayd")
            machine.run("systemctl", "restart", "zlayer-overlayd")
            assert main_pid(machine, "zlayer-overlayd") not in (0, old)
            wait_until("answers after systemctl restart", answered(10))
            old = main_pid(machine, "zlayer-overlayd")
            killed_at = time.time()
            machine.run("kill", "-9", str(old))
            wait_until(
                "overlayd restarted by systemd",
                lambda: (
                    main_pid(machine, "zlayer-overlayd") not in (0, old)
                    and is_active(machine, "zlayer-overlayd") == "active"
                ),
                timeout=60,
            )
            wait_until("answers after kill -9", answered(10), timeout=60)
            restarted_at = time.time()
            for _ in range(5):
                machine.run("systemctl", "restart", "zlayer.target", timeout=300)
            wait_until("answers after the target restarts", answered(10), timeout=60)
        finally:
            (machine.root / "root" / "dns.json.stop").touch()
            wait_until("the query loop to end", (machine.root / "root" / "dns.json").exists, 60)
        results = json.loads((machine.root / "root" / "dns.json").read_text())
        refused = [r for r in results if r[2] == "refused"]
        assert refused == [], refused
        lost = [r for r in results if not r[2].startswith("answer")]
        # The loop asks one query at a time: only the one in flight at the kill
        # can have been read by the killed process and lost with it (its time is
        # when the loop saw it fail, a moment after the kill).
        assert len(lost) <= 1 and all(abs(r[0] - killed_at) < 5 for r in lost), lost
        assert {r[2] for r in results} - {r[2] for r in lost} == {f"answer {address}"}
        assert {r[1] for r in results if r[0] > restarted_at} == {"udp", "tcp"}

        # Five target restarts in a row end healthy: every daemon active, none
        # given up on, the target active, the replica adopted and still running.
        assert is_active(machine, "zlayer.target") == "active"
        for name in DAEMONS:
            assert is_active(machine, f"zlayer-{name}") == "active", name
            result = machine.run("systemctl", "show", "-p", "Result", "--value", f"zlayer-{name}")
            assert result.stdout.strip() == "success", name
        wait_until("six running daemons", lambda: len(status(machine)) == 6 and all(
            d["state"] == "running" for d in status(machine).values()))  # fmt: skip
        after = json.loads(
            machine.run(
                "zlayerctl", "ps", "--containers", "--format", "json", "-d", "resolver"
            ).stdout
        )
        # The same container, never restarted: adopted by each new agentd.
        assert [(r["id"], r["state"], r["pid"]) for r in after] == [
            (replicas[0]["id"], "running", replicas[0]["pid"])
        ], after
    finally:  # even when a check failed: nothing left running for the next test
        machine.run("zlayerctl", "down", "resolver", timeout=120, check=False)


def test_a_daemon_that_fails_for_good_shows_in_the_target(machine: Machine) -> None:
    """A wrong configuration (exit 78: no restart) stops zlayer.target and only it."""
    config = machine.root / "etc" / "zlayer" / "apid.toml"
    kept = config.read_text() if config.exists() else None
    config.write_text("metrics_port = 'not a port'\n")
    try:
        assert machine.run("systemctl", "restart", "zlayer-apid", check=False).returncode != 0
        wait_until("zlayer.target to stop", lambda: is_active(machine, "zlayer.target") != "active")
        assert is_active(machine, "zlayer-apid") == "failed"
        for name in ("schedd", "agentd", "registryd", "overlayd", "proxyd"):
            assert is_active(machine, f"zlayer-{name}") == "active", name
        said = machine.run(
            "journalctl", "--no-pager", "-q", "-u", "zlayer-failed@zlayer-apid"
        ).stdout
        assert "zlayer-apid has failed, so zlayer.target is stopped" in said, said
    finally:
        if kept is None:
            config.unlink()
        else:
            config.write_text(kept)
    machine.run("systemctl", "reset-failed", "zlayer-apid")
    machine.run("systemctl", "start", "zlayer.target", timeout=120)
    assert is_active(machine, "zlayer.target") == "active"
    assert is_active(machine, "zlayer-apid") == "active"


# ---------------------------------------------------------------- the cluster
# etcd-server is only suggested by the package: installed here from the host into the
# machine's root (the machine has no network), as an administrator would with apt-get.


def install_etcd_server(machine: Machine) -> None:
    if machine.run("test", "-x", "/usr/bin/etcd", check=False).returncode == 0:
        return
    installed = subprocess.run(
        ["chroot", str(machine.root), "apt-get", "install", "-y", "-q",
         "--no-install-recommends", "etcd-server"],
        capture_output=True, text=True, timeout=600,
        env={**MACHINE_ENV, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    # Debian's own etcd.service (enabled by the package) would take the ports of ours.
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "disable", "--now", "etcd.service")


def test_node_init_under_systemd_runs_the_etcd_unit(machine: Machine) -> None:
    """zlayerctl node init on the packaged node: schedd has systemd start
    zlayer-etcd.service, moves its state into etcd and goes on there; the cluster
    outlives a restart of zlayer.target, and etcd's log is in the journal."""
    if machine.run("dpkg-query", "-W", "zlayer-node", check=False).returncode != 0:
        machine.run("dpkg", "-i", "/var/tmp/zlayer-node.deb")  # run alone (-k)
    install_etcd_server(machine)
    wait_until("schedd active", lambda: is_active(machine, "zlayer-schedd") == "active", 60)
    # Before init it is skipped (no cluster.toml), not failed.
    assert is_active(machine, "zlayer-etcd") == "inactive"
    machine.run("sh", "-c", "printf %s kept-through-init | zlayerctl secret set before-init")

    def secret() -> str:
        return machine.run("zlayerctl", "secret", "get", "before-init").stdout

    try:
        inited = machine.run(
            "zlayerctl", "node", "init", "--advertise", LAN, check=False, timeout=240
        )
        assert inited.returncode == 0, inited.stderr + inited.stdout
        assert is_active(machine, "zlayer-etcd") == "active"
        pid = main_pid(machine, "zlayer-etcd")
        assert machine.run("cat", f"/proc/{pid}/comm").stdout.strip() == "etcd"

        def one_ready_node() -> bool:
            listed = machine.run("zlayerctl", "node", "ls", "--format", "json", check=False)
            if listed.returncode != 0:
                return False
            nodes = json.loads(listed.stdout)["nodes"]
            return len(nodes) == 1 and nodes[0]["state"] == "ready" and nodes[0]["address"] == LAN

        wait_until("node ls to show this node ready", one_ready_node, 60)
        # The lone node's secret moved into etcd with the rest of its state, and opens.
        assert secret() == "kept-through-init"
        machine.run("systemctl", "restart", "zlayer.target", timeout=300)
        assert is_active(machine, "zlayer-etcd") == "active"
        wait_until("the cluster back after the restart", one_ready_node, 90)
        assert secret() == "kept-through-init"
        journal = machine.run(
            "journalctl", "--no-pager", "-q", "-u", "zlayer-etcd", "-o", "cat"
        ).stdout
        assert "serving client traffic securely" in journal, journal[-2000:]
    finally:
        machine.run("zlayerctl", "secret", "rm", "before-init", check=False)


def test_remove_stops_everything_and_purge_leaves_no_state(machine: Machine) -> None:
    # A stop whose grace outlasts the bus's 25 s default call timeout (httpd as PID 1
    # ignores SIGTERM, so each replica waits out the grace, then gets KILL).
    machine.run("zlayerctl", "up", "-d", "--timeout", "120", cwd="/root/app", timeout=200)
    started = time.monotonic()
    machine.run("zlayerctl", "stop", "static-web", "--timeout", "30", timeout=120)
    assert time.monotonic() - started > 25
    machine.run("zlayerctl", "up", "-b", cwd="/root/app")  # replicas running at removal
    wait_until("a replica running", lambda: "running" in machine.run(
        "zlayerctl", "ps", "--containers", cwd="/root/app").stdout)  # fmt: skip
    removed = machine.run("dpkg", "--remove", "zlayer-node")
    said = removed.stdout + removed.stderr
    units = machine.run(
        "systemctl", "list-units", "--no-legend", "--state=active", "zlayer*", check=False
    ).stdout
    assert units.strip() == ""
    assert machine.run("sh", "-c", "command -v zlayerctl", check=False).returncode != 0
    # Every unit disabled, zlayer-etcd's too: no link of the package's left to dangle.
    links = machine.run("find", "/etc/systemd/system", "-name", "zlayer*").stdout
    assert links == "", links
    # The replicas were stopped cleanly: no overlay mounts, no network namespaces left.
    mounts = machine.run("sh", "-c", "grep /var/lib/zlayer /proc/mounts", check=False).stdout
    assert mounts == "", said
    assert machine.run("ip", "netns", "list").stdout.strip() == "", said
    assert machine.run("test", "-d", "/var/lib/zlayer", check=False).returncode == 0  # kept
    # The host as it was: no nft table (its input chain rejected published ports for
    # every other program), no bridge, forwarding back off.
    assert machine.run("sh", "-c", HOST_STATE).stdout == BEFORE_INSTALL["host"], said
    machine.run("dpkg", "--purge", "zlayer-node")
    assert machine.run("test", "-e", "/var/lib/zlayer", check=False).returncode != 0
    assert machine.run("test", "-e", "/etc/zlayer", check=False).returncode != 0
    left = machine.run("sh", "-c", "find /opt/zlayer 2>/dev/null | head", check=False).stdout
    assert left == "", f"left in /opt/zlayer: {left}"
    assert machine.run("test", "-e", "/var/cache/zlayer", check=False).returncode != 0
    assert machine.run("sh", "-c", HOST_STATE).stdout == BEFORE_INSTALL["host"]


# Last: it reads the .deb alone, so the machine boots while the .deb builds.
def test_the_deb_ships_completions_and_man_pages(deb: Path) -> None:
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    paths = {line.split()[-1].removeprefix(".") for line in files.splitlines()}
    assert "/usr/share/bash-completion/completions/zlayerctl" in paths
    assert "/usr/share/zsh/vendor-completions/_zlayerctl" in paths
    assert "/usr/share/fish/vendor_completions.d/zlayerctl.fish" in paths
    for name in ("zlayerctl", *(f"zlayerctl-{command}" for command in LAZY_COMMANDS)):
        assert f"/usr/share/man/man1/{name}.1.gz" in paths
