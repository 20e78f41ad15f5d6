"""agentd's container runtime with the real crun and conmon, on a busybox root file system.

Every test runs under the leak check; the ``rt`` fixture stops and deletes
every container left in the test's state directory, through a fresh runtime
object, so a failing test leaves no mount, cgroup or process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons.agentd import cgroups
from daemons.agentd.errors import ContainerError
from daemons.agentd.runtime import ContainerRuntime
from shared.busybox_image import busybox_entries, make_tar
from shared.paths import Paths
from shared.spec import ServiceSpec
from shared.wire import encode, replace
from shared.wire.registry import ImageConfig, ImageInfo, ImageRootfs

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("conmon") or not shutil.which("crun"),
    reason="needs root, crun and conmon (apt-get install crun conmon)",
)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> ImageRootfs:
    """Debian's busybox-static with relative applet links, as one unpacked layer."""
    if not Path("/bin/busybox").exists():
        pytest.skip("needs Debian's busybox-static (apt-get install busybox-static)")
    lower = tmp_path_factory.mktemp("busybox-layer")
    with tarfile.open(fileobj=io.BytesIO(make_tar(busybox_entries()))) as tar:
        tar.extractall(lower, filter="tar")
    # Fixed here, once, so no test sees the hugetlb mount appear as a leak.
    asyncio.run(cgroups.ensure_ready())
    return ImageRootfs(
        image=ImageInfo(
            id="sha256:" + "0" * 64,
            manifest_digest="sha256:" + "1" * 64,
            names=["docker.io/zlayer/busybox:latest"],
            layers=[],
            size=0,
        ),
        config=ImageConfig(cmd=["sh"], env=["PATH=/bin"]),
        lower_dirs=[str(lower)],
    )


class Harness:
    def __init__(self, paths: Paths, rootfs: ImageRootfs) -> None:
        self.paths = paths
        self.rootfs = rootfs
        self.state_dir = paths.daemon_state("agentd")
        self.run_dir = paths.run_dir / "agentd"

    def runtime(self, **options: Any) -> ContainerRuntime:
        return ContainerRuntime(self.state_dir, self.run_dir, **options)

    async def ready(self, **options: Any) -> ContainerRuntime:
        runtime = self.runtime(**options)
        await runtime.prepare()
        return runtime

    def cleanup(self) -> None:
        async def run() -> None:
            runtime = await self.ready()
            for info in await runtime.list():
                await runtime.delete(info.id)

        asyncio.run(run())


@pytest.fixture
def rt(zlayer_prefix: Paths, busybox_rootfs: ImageRootfs) -> Iterator[Harness]:
    harness = Harness(zlayer_prefix, busybox_rootfs)
    try:
        yield harness
    finally:
        harness.cleanup()


def spec(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"image": "zlayer/busybox", **fields})


def sh(script: str, **fields: Any) -> ServiceSpec:
    return spec(command={"entrypoint": ["sh", "-c"], "args": [script]}, **fields)


async def run_to_end(
    runtime: ContainerRuntime, rootfs: ImageRootfs, cid: str, service: ServiceSpec
) -> tuple[int, bool, str]:
    """Run a container to its end: (exit code, OOM-killed, stdout+stderr text)."""
    await runtime.run(cid, service, rootfs, None, {k: str(v) for k, v in service.env.items()})
    status = await asyncio.wait_for(runtime.wait(cid), 30)
    text = "\n".join(line.text for line in runtime.read_log(runtime.log_paths(cid)))
    return status.code, status.oom_killed, text


async def wait_for_log(
    runtime: ContainerRuntime, cid: str, needle: str, timeout: float = 10
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = "\n".join(line.text for line in runtime.read_log(runtime.log_paths(cid)))
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never appeared in the log: {text!r}")
        await asyncio.sleep(0.05)


def test_output_lands_in_the_k8s_file_log_and_the_exit_code_is_recorded(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        code, oom, _text = await run_to_end(
            runtime, rt.rootfs, "t-exit", sh("echo hello; echo oops >&2; exit 7")
        )
        assert (code, oom) == (7, False)
        lines = runtime.read_log(runtime.log_paths("t-exit"))
        assert [(line.stream, line.text) for line in lines] == [
            ("stdout", "hello"),
            ("stderr", "oops"),
        ]
        assert all(line.time is not None for line in lines)
        info = await runtime.state("t-exit")
        assert info.status == "stopped" and info.exit is not None and info.exit.code == 7
        await runtime.delete("t-exit")
        assert not runtime.bundle_dir("t-exit").exists()
        assert await runtime.list() == []

    asyncio.run(scenario())


def test_image_command_env_and_workdir_reach_the_process(rt: Harness) -> None:
    rootfs = replace(
        rt.rootfs,
        config=ImageConfig(
            entrypoint=["sh", "-c"],
            cmd=['echo "$GREETING $WHO from $(pwd)"'],
            env=["PATH=/bin", "GREETING=hi", "WHO=image"],
            workdir="/etc",
        ),
    )

    async def scenario() -> None:
        runtime = await rt.ready()
        _code, _oom, text = await run_to_end(runtime, rootfs, "t-img", spec(env={"WHO": "spec"}))
        assert text == "hi spec from /etc"

    asyncio.run(scenario())


def test_stop_kills_a_pid_1_that_ignores_sigterm_after_the_grace_period(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        # busybox sleep installs no SIGTERM handler, and PID 1 ignores unhandled signals.
        pid = await runtime.run(
            "t-stop", spec(command={"args": ["sleep", "1000"]}), rt.rootfs, None, {}
        )
        assert pid > 0 and (await runtime.state("t-stop")).status == "running"
        started = time.monotonic()
        status = await runtime.stop("t-stop", "SIGTERM", grace=1.0)
        elapsed = time.monotonic() - started
        assert status.code == 137 and not status.oom_killed
        assert 1.0 <= elapsed < 3.0

        await runtime.run(
            "t-term", sh("trap 'exit 0' TERM; while :; do sleep 0.1; done"), rt.rootfs, None, {}
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        status = await runtime.stop("t-term", "TERM", grace=10.0)
        assert status.code == 0 and time.monotonic() - started < 2.0

    asyncio.run(scenario())


def test_a_process_allocating_past_its_memory_limit_is_oom_killed(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        code, oom, _ = await run_to_end(
            runtime,
            rt.rootfs,
            "t-oom",
            sh(
                "x=$(head -c 100000000 /dev/zero | tr '\\0' a); sleep 100",
                resources={"memory": "32Mi"},
            ),
        )
        assert (code, oom) == (137, True)

    asyncio.run(scenario())


def test_pids_limit_is_enforced_and_stats_read_the_cgroup(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        service = sh(
            "(for i in $(seq 1 30); do sleep 30 & done); echo started; exec sleep 30",
            resources={"pids_limit": 8, "memory": "64Mi", "cpu": 0.5},
        )
        await runtime.run("t-pids", service, rt.rootfs, None, {})
        text = await wait_for_log(runtime, "t-pids", "started")
        assert "can't fork" in text
        stats = await runtime.stats("t-pids")
        assert stats.pids_limit == 8 and 1 < stats.pids <= 8
        assert stats.memory_bytes > 0 and stats.memory_limit_bytes == 64 * 1024 * 1024
        assert stats.cpu_usage_usec > 0
        await runtime.stop("t-pids", "SIGTERM", grace=0.2)

    asyncio.run(scenario())


def test_named_volume_outlives_the_container_and_anonymous_goes_with_it(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        storage = [
            {"type": "named", "name": "keep", "target": "/data"},
            {"type": "anonymous", "target": "/cache"},
        ]
        code, _, _ = await run_to_end(
            runtime,
            rt.rootfs,
            "t-vol1",
            sh("echo one > /data/f; echo x > /cache/f", storage=storage),
        )
        assert code == 0
        anonymous = runtime.bundle_dir("t-vol1") / "volumes" / "anon-1"
        assert (anonymous / "f").read_text() == "x\n"
        await runtime.delete("t-vol1")
        assert not anonymous.exists()
        assert (runtime.volumes_dir / "keep" / "f").read_text() == "one\n"
        code, _, text = await run_to_end(
            runtime, rt.rootfs, "t-vol2", sh("cat /data/f; ls /cache | wc -l", storage=storage)
        )
        assert (code, text) == (0, "one\n0")
        fresh = [{"type": "named", "name": "mine", "target": "/data"}]
        code, _, text = await run_to_end(
            runtime,
            rt.rootfs,
            "t-vol3",
            sh("echo hi > /data/f && id -u", user="nobody", storage=fresh),
        )
        assert (code, text) == (0, "65534")

    asyncio.run(scenario())


def test_tmpfs_mount_and_read_only_root(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        service = sh(
            "grep ' /scratch ' /proc/mounts; echo ok > /scratch/f && cat /scratch/f; touch /x",
            storage=[{"type": "tmpfs", "target": "/scratch", "size": "8Mi", "mode": 0o700}],
            read_only_root_fs=True,
        )
        code, _, text = await run_to_end(runtime, rt.rootfs, "t-ro", service)
        mount_line, ok, touch = text.splitlines()
        assert mount_line.startswith("tmpfs /scratch tmpfs")
        assert "size=8192k" in mount_line and "mode=700" in mount_line
        assert ok == "ok"
        assert "Read-only file system" in touch and code == 1

    asyncio.run(scenario())


def test_user_and_capabilities(rt: Harness) -> None:
    def cap_eff(text: str) -> int:
        return int(
            next(line for line in text.splitlines() if line.startswith("CapEff")).split()[1], 16
        )

    async def scenario() -> None:
        runtime = await rt.ready()
        _, _, text = await run_to_end(
            runtime, rt.rootfs, "t-nobody", spec(command={"args": ["id"]}, user="nobody")
        )
        assert text == "uid=65534(nobody) gid=65534(nobody)"
        _, _, text = await run_to_end(
            runtime, rt.rootfs, "t-uid", sh("id -u; id -g", user="1000:1001")
        )
        assert text == "1000\n1001"

        net_raw = 1 << 13
        status = "grep Cap /proc/self/status"
        _, _, default = await run_to_end(runtime, rt.rootfs, "t-caps", sh(status))
        _, _, raw = await run_to_end(runtime, rt.rootfs, "t-raw", sh(status, cap_add=["NET_RAW"]))
        _, _, added = await run_to_end(
            runtime, rt.rootfs, "t-add", sh(status, cap_add=["NET_ADMIN"])
        )
        # NET_RAW only when the spec asks for it.
        assert not cap_eff(default) & net_raw and cap_eff(raw) & net_raw
        assert cap_eff(raw) == cap_eff(default) | net_raw
        assert cap_eff(added) == cap_eff(default) | 1 << 12

    asyncio.run(scenario())


def test_exec_returns_the_exit_code_and_writes_to_the_passed_descriptors(
    rt: Harness, tmp_path: Path
) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        await runtime.run("t-exec", spec(command={"args": ["sleep", "1000"]}), rt.rootfs, None, {})
        out_path, err_path = tmp_path / "out", tmp_path / "err"
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"from stdin\n")
        os.close(write_fd)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            code = await runtime.exec(
                "t-exec",
                ["sh", "-c", "cat; echo out $(hostname); echo err >&2; exit 3"],
                False,
                read_fd,
                out.fileno(),
                err.fileno(),
            )
        os.close(read_fd)
        assert code == 3
        assert out_path.read_text() == "from stdin\nout t-exec\n"
        assert err_path.read_text() == "err\n"
        assert await runtime.exec("t-exec", ["true"]) == 0
        primary, secondary = pty.openpty()
        code = await runtime.exec(
            "t-exec", ["sh", "-c", "tty"], True, secondary, secondary, secondary
        )
        os.close(secondary)
        # The command ran on a terminal. (crun, when loaded, sometimes hands the
        # first line back wrapped in its own coloured log prefix: only where
        # /dev/pts/ appears is crun's to decide.)
        assert code == 0 and b"/dev/pts/" in os.read(primary, 200)
        os.close(primary)
        assert await runtime.exec("t-exec", ["no-such-command"]) == 127
        await runtime.stop("t-exec", grace=0)
        with pytest.raises(ContainerError, match="not running"):
            await runtime.exec("t-exec", ["true"])

    asyncio.run(scenario())


def test_a_missing_executable_is_one_sentence_and_leaves_nothing(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready()
        with pytest.raises(ContainerError) as caught:
            await runtime.run("t-missing", spec(command={"args": ["nginx"]}), rt.rootfs, None, {})
        assert (
            str(caught.value)
            == 'container t-missing could not start: exec: "nginx": not found in the image'
        )
        assert not runtime.bundle_dir("t-missing").exists()
        with pytest.raises(ContainerError, match='the user "www" is not in the image'):
            await runtime.run("t-user", spec(user="www"), rt.rootfs, None, {})
        assert await runtime.list() == []

    asyncio.run(scenario())


CREATE_AND_LEAVE = """
import asyncio, sys
from pathlib import Path
from daemons.agentd.runtime import ContainerRuntime
from shared.wire import decode
from shared.wire.registry import ImageRootfs
from shared.spec import ServiceSpec

async def main() -> None:
    runtime = ContainerRuntime(Path(sys.argv[1]), Path(sys.argv[2]))
    await runtime.prepare()
    rootfs = decode(sys.argv[3], ImageRootfs)
    for cid, script in (("t-survivor", "sleep 1; exit 5"), ("t-gone", "exit 9")):
        spec = ServiceSpec.model_validate(
            {"image": "busybox", "command": {"entrypoint": ["sh", "-c"], "args": [script]}}
        )
        await runtime.run(cid, spec, rootfs, None, {})

asyncio.run(main())
"""


def test_a_container_outlives_its_creator_and_is_adopted(rt: Harness) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            CREATE_AND_LEAVE,
            str(rt.state_dir),
            str(rt.run_dir),
            encode(rt.rootfs),
        ],
        cwd=REPO,
        check=True,
        timeout=60,
    )

    async def scenario() -> None:
        runtime = await rt.ready()
        found = {info.id: info for info in await runtime.adopt()}
        assert set(found) == {"t-survivor", "t-gone"}
        survivor = found["t-survivor"]
        assert survivor.status == "running" and survivor.pid > 0 and survivor.conmon_pid > 0
        status = await asyncio.wait_for(runtime.wait("t-survivor"), 10)
        assert status.code == 5
        await asyncio.sleep(0.2)
        gone = await runtime.state("t-gone")
        assert gone.status == "stopped" and gone.exit is not None and gone.exit.code == 9

    asyncio.run(scenario())


def test_log_rotation_keeps_the_size_bounded(rt: Harness) -> None:
    async def scenario() -> None:
        runtime = await rt.ready(log_size_max=16 * 1024, log_files_kept=2)
        service = sh(
            "i=0; while [ $i -lt 4000 ]; do echo line-$i-padding-padding-padding; i=$((i+1));"
            " [ $((i % 100)) -eq 0 ] && sleep 0.02; done; echo last"
        )
        await runtime.run("t-logs", service, rt.rootfs, None, {})
        rotations = 0
        while (await runtime.state("t-logs")).status == "running":
            before = runtime.log_paths("t-logs")
            await runtime.rotate_logs()
            rotations += runtime.log_paths("t-logs") != before
            await asyncio.sleep(0.05)
        paths = runtime.log_paths("t-logs")
        # ctr.log itself is absent when the last rotation came after the container's
        # last line and conmon, ending, did not open a new one
        names = [p.name for p in paths]
        assert names in (["ctr.log.2", "ctr.log.1", "ctr.log"], ["ctr.log.2", "ctr.log.1"])
        assert sum(p.stat().st_size for p in paths) <= 3 * 16 * 1024
        lines = [line.text for line in runtime.read_log(paths)]
        assert lines[-1] == "last"
        numbers = [int(t.split("-")[1]) for t in lines if t.startswith("line-")]
        assert numbers == sorted(numbers)

    asyncio.run(scenario())


def test_cgroups_are_ready_for_crun() -> None:
    layout = cgroups.detect_layout()
    assert not layout.hugetlb_on_v2
    assert cgroups.cgroup_manager() in ("cgroupfs", "systemd")


def test_a_create_keeps_the_cgroup_move_lock_warm_and_leaves_agentd_where_it_was(
    rt: Harness,
) -> None:
    """The warmer moves this process into the cgroup it is in while a create runs
    (cgroups.MoveLockWarmer), and only then: afterwards its thread makes no move,
    and the process's cgroups are what they were."""
    before = Path("/proc/self/cgroup").read_text()

    async def scenario() -> None:
        runtime = await rt.ready()
        procs = cgroups.own_procs_file(runtime._layout())
        assert procs is not None and str(os.getpid()) in procs.read_text().split()
        code, _oom, text = await run_to_end(runtime, rt.rootfs, "t-warm", sh("echo warm"))
        assert (code, text) == (0, "warm")
        await asyncio.sleep(0.1)  # a move begun as the create ended has ended
        moves = runtime.move_warmer.moves
        assert moves > 0
        await asyncio.sleep(0.3)
        assert runtime.move_warmer.moves == moves

    asyncio.run(scenario())
    assert Path("/proc/self/cgroup").read_text() == before


@pytest.mark.skipif(not shutil.which("runc"), reason="runc is not installed")
def test_runc_as_the_fallback_runtime(rt: Harness, tmp_path: Path) -> None:
    async def scenario() -> None:
        runtime = await rt.ready(runtime_path="runc")
        assert runtime.runtime_name == "runc"
        code, oom, text = await run_to_end(runtime, rt.rootfs, "t-runc", sh("echo hi; exit 4"))
        assert (code, oom, text) == (4, False, "hi")
        await runtime.run("t-runc2", spec(command={"args": ["sleep", "1000"]}), rt.rootfs, None, {})
        with open(tmp_path / "out", "wb") as out:
            assert await runtime.exec("t-runc2", ["hostname"], stdout_fd=out.fileno()) == 0
        assert (tmp_path / "out").read_text() == "t-runc2\n"
        assert (await runtime.stop("t-runc2", grace=0.5)).code == 137

    asyncio.run(scenario())


def test_crun_containers_start_without_running_crun_start(rt: Harness, tmp_path: Path) -> None:
    """The start of a crun container is its exec.fifo written by agentd: the process
    runs, crun says so, and crun itself ran for the create alone."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bin" / "crun"
    wrapper.parent.mkdir()
    real = shutil.which("crun")
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)

    async def scenario() -> None:
        runtime = await rt.ready(runtime_path=str(wrapper))
        pid = await runtime.run("t-fifo", sh("echo started; exec sleep 1000"), rt.rootfs, None, {})
        assert pid > 0
        assert await wait_for_log(runtime, "t-fifo", "started")
        info = await runtime.state("t-fifo")
        assert (info.status, info.pid) == ("running", pid)
        run = [line.split() for line in calls.read_text().splitlines()]
        commands = [next(a for a in args if not a.startswith("--")) for args in run]
        assert "create" in commands and "start" not in commands
        # Started already: a second start is the runtime's refusal, in one sentence.
        with pytest.raises(ContainerError, match="could not start"):
            await runtime.start("t-fifo")
        assert (await runtime.stop("t-fifo", grace=0.5)).code == 137

    asyncio.run(scenario())


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A cgroup parent for one test, removed in every hierarchy after its containers.

    crun removes a replica's cgroup, never the parent it was asked to create.
    Asked for before ``rt``, so it is torn down after ``rt`` removed the containers.
    """
    parent = f"/zlayer-test-parent-{os.getpid()}"  # the leak check looks for "zlayer"
    yield parent
    for root in [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").iterdir()]:
        with contextlib.suppress(OSError):
            (root / parent.lstrip("/")).rmdir()


def test_host_namespaces_extra_groups_init_and_cgroup_parent(
    cgroup_parent: str, rt: Harness
) -> None:
    """pid_mode/ipc_mode host, extra_groups, no-new-privileges off, tini as PID 1 and a
    cgroup parent of the service's own, each seen from inside a real container."""
    parent = cgroup_parent

    async def scenario() -> None:
        runtime = await rt.ready()
        host_ipc = os.readlink("/proc/self/ns/ipc")
        _, _, text = await run_to_end(
            runtime,
            rt.rootfs,
            "t-hostns",
            sh("cat /proc/1/comm; readlink /proc/self/ns/ipc", pid_mode="host", ipc_mode="host"),
        )
        pid1 = Path("/proc/1/comm").read_text().strip()
        assert text.splitlines() == [pid1, host_ipc]
        _, _, text = await run_to_end(
            runtime, rt.rootfs, "t-ownns", sh("cat /proc/1/comm; readlink /proc/self/ns/ipc")
        )
        assert text.splitlines()[1] != host_ipc and text.splitlines()[0] == "sh"

        _, _, text = await run_to_end(
            runtime,
            rt.rootfs,
            "t-groups",
            sh(
                "id -G; grep NoNewPrivs /proc/self/status",
                user="nobody",
                extra_groups=["4242", "root"],
                security_opt=["no-new-privileges:false"],
            ),
        )
        groups, nnp = text.splitlines()
        assert set(groups.split()) == {"65534", "4242", "0"}
        assert nnp.split() == ["NoNewPrivs:", "0"]

        _, _, text = await run_to_end(
            runtime,
            rt.rootfs,
            "t-init",
            sh("cat /proc/1/comm; echo $$; cat /proc/self/cgroup", init_container=True,
               cgroup_parent=parent),
        )  # fmt: skip
        comm, own_pid, *cgroup_lines = text.splitlines()
        assert comm == "zlayer-init" and own_pid != "1"
        assert any(f"{parent}/t-init" in line for line in cgroup_lines), cgroup_lines

    asyncio.run(scenario())
