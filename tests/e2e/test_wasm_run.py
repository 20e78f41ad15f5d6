"""WebAssembly replicas end to end: WASI commands as jobs and services under wasmtime.

The modules are built here from WAT (``wasmtime.wat2wasm``), packed as artifacts
with ``zlayerctl wasm export`` and imported; each runs as a replica through
zlayerctl, as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import wasmtime

from shared.bus import open_bus, resolve_bus_address
from shared.clients import SchedulerClient
from tests.e2e.node import Node, wait_until


@pytest.fixture(scope="module")
def node(shared_node: Node) -> Node:
    """The node the modules that leave it as they found it share (the end-to-end conftest)."""
    return shared_node


pytestmark = pytest.mark.timeout(300)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A WASIp1 command: writes its line to fd 1 (fd_write) and exits with 7 (proc_exit).
HELLO = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 7))))
"""

# Spins forever: stopped only by its fuel, or by a stop.
LOOP = r"""
(module
  (func (export "_start") (loop $l (br $l))))
"""

# Prints its first argument and $GREETING on one line, then lives until stopped:
# args_get/environ_get into memory, written with fd_write; sleeps by poll_oneoff.
ECHO = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $n))
  (func $print (param $p i32)
    (i32.store (i32.const 0) (local.get $p))
    (i32.store (i32.const 4) (call $strlen (local.get $p)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (call $print (i32.load (i32.const 1028)))
    (i32.store8 (i32.const 64) (i32.const 32))
    (call $print (i32.const 64))
    (drop (call $environ_get (i32.const 8192) (i32.const 12288)))
    (call $print (i32.load (i32.const 8192)))
    (i32.store8 (i32.const 64) (i32.const 10))
    (call $print (i32.const 64))
    ;; a relative clock subscription of an hour, again and again
    (i64.store (i32.const 128) (i64.const 0))
    (i32.store8 (i32.const 136) (i32.const 0))
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const 3600000000000))
    (i64.store (i32.const 160) (i64.const 0))
    (i32.store16 (i32.const 168) (i32.const 0))
    (loop $forever
      (drop (call $poll_oneoff (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 512)))
      (br $forever))))
"""


# A WASIp2 command component: exports wasi:cli/run whose run returns ok (0) or err (1).
COMPONENT = r"""
(component
  (core module $m (func (export "run") (result i32) i32.const RESULT))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $inst (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $inst)))
"""


# Asks for 100 pages (6.4 MB) of memory at instantiation.
BIG_MEMORY = r"""
(module (memory 100) (func (export "_start")))
"""


# Writes "written by wasm" to out.txt in its first preopened directory (fd 3).
WRITER = r"""
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "out.txt")
  (data (i32.const 96) "written by wasm\n")
  (func (export "_start") (local $err i32)
    ;; path_open(dirfd 3, lookup 0, "out.txt", O_CREAT|O_TRUNC, rights all, inherit all, 0, &fd)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 7)
      (i32.const 9) (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 128)))
    (if (local.get $err) (then (call $proc_exit (i32.add (i32.const 10) (local.get $err)))))
    (i32.store (i32.const 0) (i32.const 96))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.load (i32.const 128)) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $proc_exit (i32.const 0))))
"""


def wasm_image(node: Node, name: str, wat: str, reference: str = "") -> str:
    """The module built from ``wat``, exported as an artifact and imported; its name."""
    module = node.workdir / f"{name}.wasm"
    module.write_bytes(wasmtime.wat2wasm(wat))
    layout = node.workdir / f"{name}.oci"
    reference = reference or f"localhost/{name}:1"
    node.ctl(
        "wasm", "export", str(module), "--name", reference, "--output", str(layout), check=True
    )
    node.ctl("image", "import", str(layout), "--name", reference, check=True)
    return reference


def memory_limit(pid: int) -> int:
    """The memory limit of the cgroup ``pid`` is in (cgroup v2 or v1)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").exists():
            return int((Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").read_text())
        if "memory" in controllers.split(","):
            limit = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
            return int(limit.read_text())
    raise AssertionError(f"no memory cgroup for {pid}")


def mount_types(pid: int) -> dict[str, str]:
    """Each mount point of ``pid``'s mount namespace and its file system type."""
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields, _sep, after = line.partition(" - ")
        found[fields.split()[4]] = after.split()[0]
    return found


def replica_of(node: Node, deployment: str, service: str) -> dict[str, object] | None:
    return next((r for r in node.replicas(deployment) if r["service"] == service), None)


def test_a_wasi_job_prints_to_its_logs_and_exits_with_its_code(node: Node) -> None:
    image = wasm_image(node, "hello", HELLO)
    spec = node.spec(
        "wasmjob",
        f"""
        version: v1
        deployment: wasmjob
        services:
          hello:
            rtype: job
            image: {image}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        run = node.ctl("job", "trigger", "hello", "-d", "wasmjob", "--wait", timeout=60)
        assert run.returncode == 7, run.stdout + run.stderr
        status = json.loads(
            node.ctl("job", "status", "hello", "-d", "wasmjob", "--format", "json").stdout
        )
        assert status[0]["exit_code"] == 7 and status[0]["state"] == "failed"
        logs = node.ctl("logs", "hello", "-d", "wasmjob", "-n", "5", check=True)
        assert "hello from wasm" in logs.stdout
    finally:
        node.ctl("down", "wasmjob")


def test_storage_is_a_preopened_directory_of_the_module(node: Node) -> None:
    image = wasm_image(node, "writer", WRITER)
    spec = node.spec(
        "wasmvol",
        f"""
        version: v1
        deployment: wasmvol
        services:
          writer:
            rtype: job
            image: {image}
            storage: [{{type: named, name: wasmvol-data, target: /data}}]
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        run = node.ctl("job", "trigger", "writer", "-d", "wasmvol", "--wait", timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        volume = node.paths.daemon_state("agentd") / "volumes" / "wasmvol-data"
        assert (volume / "out.txt").read_text() == "written by wasm\n"
    finally:
        node.ctl("down", "wasmvol")


def test_wasip2_components_run_as_jobs_with_their_exit_codes(node: Node) -> None:
    ok = wasm_image(node, "p2ok", COMPONENT.replace("RESULT", "0"))
    err = wasm_image(node, "p2err", COMPONENT.replace("RESULT", "1"))
    spec = node.spec(
        "wasmp2",
        f"""
        version: v1
        deployment: wasmp2
        services:
          ok:
            rtype: job
            image: {ok}
          err:
            rtype: job
            image: {err}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        for service, code, state in (("ok", 0, "succeeded"), ("err", 1, "failed")):
            run = node.ctl("job", "trigger", service, "-d", "wasmp2", "--wait", timeout=60)
            assert run.returncode == code, run.stdout + run.stderr
            status = json.loads(
                node.ctl("job", "status", service, "-d", "wasmp2", "--format", "json").stdout
            )
            assert (status[0]["exit_code"], status[0]["state"]) == (code, state), status[0]
    finally:
        node.ctl("down", "wasmp2")


def test_a_wasi_service_gets_its_args_env_and_restarts_by_policy(node: Node) -> None:
    image = wasm_image(node, "echo", ECHO)
    spec = node.spec(
        "wasmsvc",
        f"""
        version: v1
        deployment: wasmsvc
        services:
          echo:
            image: {image}
            command: {{args: ["first-arg"]}}
            env: {{GREETING: hi-there}}
            restart_policy: {{kind: always, delay: 1s}}
            resources: {{memory: 64Mi}}
            scale: {{mode: fixed, replicas: 1}}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        first = wait_until(
            lambda: (r := replica_of(node, "wasmsvc", "echo")) and r["state"] == "running" and r,
            30,
            "the wasm service to run",
        )
        assert first["address"], first

        def printed() -> bool:
            out = node.ctl("logs", "echo", "-d", "wasmsvc", "-n", "5").stdout
            return "first-arg GREETING=hi-there" in out

        wait_until(printed, 15, "the module's line in its logs")
        # wasmtime runs in the replica's own memory cgroup, limited as the spec says.
        assert memory_limit(int(str(first["pid"]))) == 64 * 1024 * 1024
        # wasmtime's root is an empty read-only directory, not an overlay of the
        # artifact's layer, and it goes without sysfs, devpts, shm and mqueue.
        mounts = mount_types(int(str(first["pid"])))
        assert mounts["/"] != "overlay", mounts
        assert {"/sys", "/dev/pts", "/dev/shm", "/dev/mqueue"}.isdisjoint(mounts), mounts
        assert mounts["/proc"] == "proc", mounts
        # Its process is wasmtime; killed, the policy starts it again.
        os.kill(int(str(first["pid"])), signal.SIGKILL)
        wait_until(
            lambda: (
                (r := replica_of(node, "wasmsvc", "echo"))
                and r["state"] == "running"
                and int(str(r["restarts"])) >= 1
            ),
            30,
            "the wasm service to be restarted",
        )
    finally:
        node.ctl("down", "wasmsvc")


def test_fuel_and_memory_overruns_are_stopped_with_an_event_naming_the_limit(node: Node) -> None:
    image = wasm_image(node, "spin", LOOP)
    big = wasm_image(node, "big", BIG_MEMORY)
    spec = node.spec(
        "wasmfuel",
        f"""
        version: v1
        deployment: wasmfuel
        services:
          spin:
            rtype: job
            image: {image}
            wasm: {{max_fuel: 1000000}}
          big:
            rtype: job
            image: {big}
            wasm: {{max_memory: 1Mi}}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        run = node.ctl("job", "trigger", "spin", "-d", "wasmfuel", "--wait", timeout=60)
        assert run.returncode != 0
        status = json.loads(
            node.ctl("job", "status", "spin", "-d", "wasmfuel", "--format", "json").stdout
        )
        assert status[0]["state"] == "failed"
        assert "used its fuel of 1000000" in status[0]["message"], status[0]
        wait_until(
            lambda: (
                "used its fuel of 1000000"
                in node.ctl("events", "-d", "wasmfuel", "--format", "json").stdout
            ),
            15,
            "the event naming the fuel limit",
        )
        run = node.ctl("job", "trigger", "big", "-d", "wasmfuel", "--wait", timeout=60)
        assert run.returncode != 0
        status = json.loads(
            node.ctl("job", "status", "big", "-d", "wasmfuel", "--format", "json").stdout
        )
        assert "more memory than its max_memory of 1048576 bytes" in status[0]["message"]
    finally:
        node.ctl("down", "wasmfuel")


def test_a_command_health_check_in_a_wasm_service_is_refused_with_one_sentence(
    node: Node,
) -> None:
    # Nothing in the spec says the image is WebAssembly: agentd finds it and refuses.
    image = wasm_image(node, "echohc", ECHO)
    spec = node.spec(
        "wasmhc",
        f"""
        version: v1
        deployment: wasmhc
        services:
          echo:
            image: {image}
            health: {{check: {{type: command, command: ["true"]}}}}
            scale: {{mode: fixed, replicas: 1}}
        """,
    )
    up = node.ctl("up", "-d", str(spec), "--timeout", "20")
    try:
        sentence = (
            "a command health check cannot run in a WebAssembly replica (its root holds the "
            "module and wasmtime, with no commands to run); use an http or tcp check"
        )
        assert up.returncode != 0 and sentence in up.stderr, up
        (replica,) = wait_until(
            lambda: [r for r in node.replicas("wasmhc") if sentence in str(r["message"])],
            30,
            "the refusal in the replica's message",
        )
        assert replica["state"] == "failed" and not replica["pid"], replica
        # No retry can start it: it stays failed, with no attempt after the first (a retry
        # would come 1 s, then 3 s after it: agentd's backoff starts at 1 s and doubles).
        time.sleep(5)
        (later,) = node.replicas("wasmhc")
        assert later["state"] == "failed" and later["message"] == replica["message"], later
        assert later["restarts"] == 0 and "retrying" not in str(later["message"]), later
        attempts = agentd_log(node).count(f"{replica['id']} did not start")
        assert attempts == 1, f"{attempts} start attempts"
        # Nor does schedd's resend of agentd's whole view (every 15 s, asked for here):
        # the assignment it carries is the same, so the failed replica is left failed.
        accepted = views_agentd_took(node)
        resync_agentd(node)
        wait_until(lambda: views_agentd_took(node) > accepted, 10, "agentd to take the view")
        time.sleep(2)  # a restart would come within agentd's first backoff, 1 s
        (resynced,) = node.replicas("wasmhc")
        assert resynced["state"] == "failed" and resynced["restarts"] == 0, resynced
        attempts = agentd_log(node).count(f"{replica['id']} did not start")
        assert attempts == 1, f"{attempts} start attempts after a resync"
        # Deploying the same spec again tries once more, and is refused once more.
        again = node.ctl("up", "-d", str(spec), "--timeout", "20")
        assert again.returncode != 0 and sentence in again.stderr, again
        wait_until(
            lambda: agentd_log(node).count(f"{replica['id']} did not start") == 2,
            30,
            "a second start attempt after the deploy",
        )
        # The spec fixed, a deploy starts it.
        fixed = spec.read_text().replace('health: {check: {type: command, command: ["true"]}}', "")
        spec.write_text(fixed)
        node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
        wait_until(
            lambda: [r for r in node.replicas("wasmhc") if r["state"] == "running"],
            30,
            "the fixed replica running",
        )
    finally:
        node.ctl("down", "wasmhc")


def resync_agentd(node: Node) -> None:
    """Have schedd send agentd its whole view now (``Resync``, as a restarted agentd asks)."""

    async def ask() -> None:
        bus = open_bus(resolve_bus_address(node.paths))
        try:
            await SchedulerClient(bus).resync("agentd")
        finally:
            bus.close()

    asyncio.run(ask())


def views_agentd_took(node: Node) -> float:
    """How many complete views schedd has sent agentd that it accepted (schedd's metric)."""
    rows = json.loads(node.ctl("status", "--format", "json", check=True).stdout)
    url = next(row["metrics_url"] for row in rows if row["name"] == "schedd")
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    line = 'zlayer_scheduler_views_sent_total{daemon="agentd",result="accepted"}'
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def agentd_log(node: Node) -> str:
    return "\n".join(p.read_text(errors="replace") for p in node.paths.log_dir.glob("agentd*.log"))


def test_an_epoch_interval_wasmtime_cannot_tick_at_is_refused_at_deploy(node: Node) -> None:
    image = wasm_image(node, "spinepoch", LOOP)
    spec = node.spec(
        "wasmepoch",
        f"""
        version: v1
        deployment: wasmepoch
        services:
          spin:
            rtype: job
            image: {image}
            wasm: {{epoch_interval: 100ms}}
        """,
    )
    sentence = (
        "service spin: wasm.epoch_interval is how often a wasi:http request yields to the "
        "others, and a WASI command runs alone under wasmtime run, which has no epoch ticks to "
        "set; remove it and bound the module's work with max_fuel"
    )
    up = node.ctl("up", "-d", str(spec), "--timeout", "30")
    try:
        assert up.returncode != 0 and sentence in up.stderr, up
        assert "wasmepoch" not in node.ctl("ps", "--format", "json").stdout
    finally:
        node.ctl("down", "wasmepoch")


def test_a_wasm_replica_keeps_running_while_agentd_restarts(restarted_node: Node) -> None:
    node = restarted_node
    image = wasm_image(node, "echokeep", ECHO)
    spec = node.spec(
        "wasmkeep",
        f"""
        version: v1
        deployment: wasmkeep
        services:
          echo:
            image: {image}
            command: {{args: ["kept"]}}
            scale: {{mode: fixed, replicas: 1}}
        """,
    )
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    before = wait_until(
        lambda: (r := replica_of(node, "wasmkeep", "echo")) and r["state"] == "running" and r,
        30,
        "the wasm service to run",
    )
    agentd = node.daemon_pid("agentd")
    os.kill(agentd, signal.SIGKILL)
    wait_until(
        lambda: (
            node.ctl("status", "--format", "json").returncode == 0
            and node.daemon_pid("agentd") not in (0, agentd)
        ),
        60,
        "agentd to be started again",
    )
    time.sleep(1)
    after = wait_until(
        lambda: (r := replica_of(node, "wasmkeep", "echo")) and r["state"] == "running" and r,
        30,
        "the adopted replica",
    )
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    os.kill(int(str(before["pid"])), 0)  # the same wasmtime process, never stopped
    node.ctl("down", "wasmkeep", check=True)


def test_the_wasm_job_example_runs_as_its_comments_say(node: Node) -> None:
    wasm_image(
        node, "example", (EXAMPLES / "wasm-job" / "hello.wat").read_text(), "localhost/wasm-hello:1"
    )
    spec = EXAMPLES / "wasm-job.zlayer.yml"
    node.ctl("up", "-d", str(spec), "--timeout", "60", check=True)
    try:
        run = node.ctl("job", "trigger", "hello", "-d", "wasm-hello", "--wait", timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        logs = node.ctl("logs", "hello", "-d", "wasm-hello", "-n", "5", check=True)
        assert "world GREETING=hello" in logs.stdout
        volume = node.paths.daemon_state("agentd") / "volumes" / "wasm-hello-out"
        assert (volume / "out.txt").read_text() == "written by wasm\n"
    finally:
        node.ctl("down", "wasm-hello")
