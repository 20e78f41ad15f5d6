"""The OCI config agentd builds for a replica: pure, with the host's facts pinned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemons.agentd import bundle, cgroups
from daemons.agentd.bundle import HostFacts, ReplicaIds, build_bundle, resolve_user
from daemons.agentd.errors import BundleError
from shared.spec import ServiceSpec
from shared.spec.models import Ulimit
from shared.wire.overlay import Attachment
from shared.wire.registry import ImageConfig, ImageInfo, ImageRootfs

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\napp:x:1000:\nwheel:x:10:app,root\naudio:x:29:app\n"
HOST = HostFacts(
    cgroups_path="/zlayer/web-1",
    rlimit_hard={"RLIMIT_NOFILE": 20000, "RLIMIT_NPROC": -1},
    cap_bounding=frozenset(bundle.ALL_CAPS) - {"SYS_RESOURCE"},
    swap_limit=True,
)


@pytest.fixture
def layers(tmp_path: Path) -> list[str]:
    top, base = tmp_path / "top", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "passwd").write_text(PASSWD)
    (top / "etc" / "group").write_text(GROUP)
    return [str(top), str(base)]


def image(layers: list[str], **config: Any) -> ImageRootfs:
    return ImageRootfs(
        image=ImageInfo(
            id="sha256:" + "a" * 64,
            manifest_digest="sha256:" + "b" * 64,
            names=["docker.io/library/app:1"],
            layers=[],
            size=0,
        ),
        config=ImageConfig(**config),
        lower_dirs=layers,
    )


def spec(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({"image": "app:1", **fields})


def build(
    layers: list[str], service: ServiceSpec, host: HostFacts = HOST, **config: Any
) -> bundle.Bundle:
    config.setdefault("cmd", ["serve"])
    return build_bundle(
        service,
        image(layers, **config),
        None,
        {},
        ReplicaIds("web-1", "shop", "web", 1, 3),
        Path("/b/web-1"),
        Path("/v"),
        host,
    )


# ---------------------------------------------------------------- process args


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ({}, ["/entry", "--flag", "serve"]),
        ({"args": ["other"]}, ["/entry", "--flag", "other"]),
        ({"entrypoint": ["sh", "-c"]}, ["sh", "-c"]),
        ({"entrypoint": ["sh", "-c"], "args": ["echo hi"]}, ["sh", "-c", "echo hi"]),
        ({"entrypoint": [], "args": ["true"]}, ["true"]),
    ],
)
def test_docker_rules_for_entrypoint_and_cmd(
    layers: list[str], command: dict[str, Any], expected: list[str]
) -> None:
    rootfs = image(layers, entrypoint=["/entry", "--flag"], cmd=["serve"])
    assert bundle.process_args(spec(command=command), rootfs) == expected


def test_override_replaces_the_whole_command_and_no_command_is_an_error(layers: list[str]) -> None:
    rootfs = image(layers, entrypoint=["/entry"], cmd=["serve"])
    assert bundle.process_args(spec(), rootfs, ["sh", "-c", "x"]) == ["sh", "-c", "x"]
    with pytest.raises(BundleError, match="has no entrypoint or cmd"):
        bundle.process_args(spec(), image(layers))


def test_env_image_overlaid_by_spec_with_defaults(layers: list[str]) -> None:
    result = build_bundle(
        spec(),
        image(layers, cmd=["x"], env=["PATH=/bin", "A=image", "B=image"]),
        None,
        {"B": "spec", "C": "spec"},
        ReplicaIds("web-1", hostname="web-1"),
        Path("/b/web-1"),
        Path("/v"),
        HOST,
    )
    assert result.config["process"]["env"] == [
        "PATH=/bin",
        "A=image",
        "B=spec",
        "C=spec",
        "HOSTNAME=web-1",
        "HOME=/root",
    ]


def test_workdir_from_spec_over_image(layers: list[str]) -> None:
    assert build(layers, spec(), workdir="/srv").config["process"]["cwd"] == "/srv"
    service = spec(command={"workdir": "/app"})
    assert build(layers, service, workdir="/srv").config["process"]["cwd"] == "/app"
    assert build(layers, spec()).config["process"]["cwd"] == "/"
    with pytest.raises(BundleError, match="must be an absolute path"):
        build(layers, spec(command={"workdir": "rel"}))


# ---------------------------------------------------------------- user


@pytest.mark.parametrize(
    ("user", "uid", "gid", "extra", "home"),
    [
        ("", 0, 0, (), "/root"),
        ("0", 0, 0, (), "/root"),
        ("nobody", 65534, 65534, (), "/nonexistent"),
        ("app", 1000, 1000, (10, 29), "/home/app"),
        ("app:wheel", 1000, 10, (29,), "/home/app"),
        ("1000", 1000, 1000, (), "/home/app"),
        ("4242", 4242, 0, (), "/"),
        ("4242:4343", 4242, 4343, (), "/"),
        ("nobody:0", 65534, 0, (), "/nonexistent"),
    ],
)
def test_users_resolve_from_the_images_files(
    layers: list[str], user: str, uid: int, gid: int, extra: tuple[int, ...], home: str
) -> None:
    assert resolve_user(user, layers) == bundle.ResolvedUser(uid, gid, extra, home)


def test_unknown_user_or_group_is_a_sentence(layers: list[str]) -> None:
    with pytest.raises(BundleError, match='the user "www" is not in the image\'s /etc/passwd'):
        resolve_user("www", layers)
    with pytest.raises(BundleError, match='the group "staff" is not in the image\'s /etc/group'):
        resolve_user("app:staff", layers)


def test_the_topmost_layer_wins_for_passwd(layers: list[str]) -> None:
    assert resolve_user("app", layers).uid == 1000
    with pytest.raises(BundleError):
        resolve_user("app", layers[1:])


def test_user_reaches_the_config_from_spec_or_image(layers: list[str]) -> None:
    config = build(layers, spec(), user="nobody").config
    assert config["process"]["user"] == {"uid": 65534, "gid": 65534}
    config = build(layers, spec(user="app"), user="nobody").config
    assert config["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 29]}


# ---------------------------------------------------------------- capabilities


def caps(service: ServiceSpec, bounding: frozenset[str] = frozenset(bundle.ALL_CAPS)) -> set[str]:
    names, _ = bundle.capabilities(service, bounding)
    return {n.removeprefix("CAP_") for n in names}


def test_capabilities_default_add_drop_and_privileged() -> None:
    assert caps(spec()) == set(bundle.DEFAULT_CAPS)
    assert caps(spec(cap_add=["NET_ADMIN", "cap_sys_ptrace"])) == {
        *bundle.DEFAULT_CAPS,
        "NET_ADMIN",
        "SYS_PTRACE",
    }
    assert caps(spec(cap_drop=["CAP_NET_RAW", "chown"])) == set(bundle.DEFAULT_CAPS) - {
        "NET_RAW",
        "CHOWN",
    }
    assert caps(spec(cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"])) == {"NET_BIND_SERVICE"}
    assert caps(spec(privileged=True)) == set(bundle.ALL_CAPS)
    assert caps(spec(cap_add=["ALL"], cap_drop=["SYS_ADMIN"])) == set(bundle.ALL_CAPS) - {
        "SYS_ADMIN"
    }


def test_capabilities_never_exceed_the_bounding_set() -> None:
    bounding = frozenset(bundle.ALL_CAPS) - {"SYS_RESOURCE"}
    names, warnings = bundle.capabilities(spec(cap_add=["SYS_RESOURCE"]), bounding)
    assert "CAP_SYS_RESOURCE" not in names and "CAP_SYS_RESOURCE" in warnings[0]
    assert "SYS_RESOURCE" not in caps(spec(privileged=True), bounding)
    with pytest.raises(BundleError, match='"NET_WIZARD" is not a Linux capability'):
        caps(spec(cap_add=["NET_WIZARD"]))


def test_capability_sets_and_no_new_privileges(layers: list[str]) -> None:
    process = build(layers, spec(cap_drop=["NET_RAW"])).config["process"]
    assert process["capabilities"]["bounding"] == process["capabilities"]["effective"]
    assert "CAP_NET_RAW" not in process["capabilities"]["bounding"]
    assert process["noNewPrivileges"] is True
    assert build(layers, spec(privileged=True)).config["process"]["noNewPrivileges"] is False


# ---------------------------------------------------------------- rlimits


def test_rlimits_are_clamped_to_the_hosts_hard_limits() -> None:
    limits, warnings = bundle.rlimits(
        {
            "nofile": Ulimit(soft=1048576, hard=1048576),
            "nproc": 4096,
            "core": Ulimit(soft=0, hard=-1),
        },
        {"RLIMIT_NOFILE": 20000, "RLIMIT_NPROC": -1},
    )
    assert limits == [
        {"type": "RLIMIT_CORE", "hard": bundle.RLIM_INFINITY, "soft": 0},
        {"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000},
        {"type": "RLIMIT_NPROC", "hard": 4096, "soft": 4096},
    ]
    assert warnings == ["ulimit nofile 1048576 is above this node's hard limit; using 20000"]
    with pytest.raises(BundleError, match='"files" is not a resource limit'):
        bundle.rlimits({"files": 10}, {})


def test_no_rlimits_asked_none_written(layers: list[str]) -> None:
    assert "rlimits" not in build(layers, spec()).config["process"]
    config = build(layers, spec(ulimits={"nofile": {"soft": 100, "hard": 50000}})).config
    assert config["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 100}]


# ---------------------------------------------------------------- mounts


def mounts_by_target(result: bundle.Bundle) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in result.config["mounts"]}


def test_base_mounts_and_etc_files(layers: list[str]) -> None:
    result = build(layers, spec(hostname="shop-web", extra_hosts=["db:10.1.0.5"]))
    mounts = mounts_by_target(result)
    assert [
        mounts[t]["type"] for t in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue")
    ] == [
        "proc",
        "tmpfs",
        "devpts",
        "tmpfs",
        "mqueue",
    ]
    assert "ro" in mounts["/sys"]["options"]
    for name, target in (("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")):
        assert mounts[target]["source"] == f"/b/web-1/{name}"
        assert mounts[target]["type"] == "bind"
    assert result.files["hostname"] == "shop-web\n"
    assert "127.0.1.1\tshop-web" in result.files["hosts"]
    assert "10.1.0.5\tdb" in result.files["hosts"]
    assert result.config["hostname"] == "shop-web"


def test_a_minimal_bundle_has_no_terminals_shared_memory_queues_or_sysfs(
    layers: list[str],
) -> None:
    full = build(layers, spec())
    minimal = build_bundle(
        spec(),
        image(layers, cmd=["serve"]),
        None,
        {},
        ReplicaIds("web-1", "shop", "web", 1, 3),
        Path("/b/web-1"),
        Path("/v"),
        HOST,
        minimal=True,
    )
    left_out = set(mounts_by_target(full)) - set(mounts_by_target(minimal))
    assert left_out == {"/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"}
    assert {"/proc", "/dev", "/etc/hosts"} <= set(mounts_by_target(minimal))
    masked = minimal.config["linux"]["maskedPaths"]
    assert "/proc/kcore" in masked and not any(p.startswith("/sys/") for p in masked)
    # the root is the image's overlay either way: only a WebAssembly replica's is not
    assert full.overlay_root and minimal.overlay_root


def test_storage_kinds(layers: list[str]) -> None:
    service = spec(
        storage=[
            {"type": "bind", "source": "/srv/data", "target": "/data", "readonly": True},
            {"type": "named", "name": "pg-data", "target": "/var/lib/pg"},
            {"type": "anonymous", "target": "/cache"},
            {"type": "tmpfs", "target": "/tmp", "size": "64Mi", "mode": 0o1777},
            {"type": "bind", "source": "/srv/logs", "target": "/data/logs"},
        ]
    )
    result = build(layers, service)
    mounts = mounts_by_target(result)
    assert mounts["/data"]["source"] == "/srv/data" and "ro" in mounts["/data"]["options"]
    assert mounts["/var/lib/pg"]["source"] == "/v/pg-data"
    assert "ro" not in mounts["/var/lib/pg"]["options"]
    assert mounts["/cache"]["source"] == "/b/web-1/volumes/anon-2"
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert mounts["/tmp"]["options"] == ["nosuid", "nodev", "size=67108864", "mode=1777"]
    targets = [m["destination"] for m in result.config["mounts"]]
    assert targets.index("/data") < targets.index("/data/logs")
    assert result.named_volumes == [Path("/v/pg-data")]
    assert result.directories == [Path("/v/pg-data"), Path("/b/web-1/volumes/anon-2")]


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"type": "named", "name": "../etc", "target": "/x"}, "may hold only letters"),
        ({"type": "bind", "source": "rel/dir", "target": "/x"}, "must be an absolute path"),
        ({"type": "anonymous", "target": "/a/../../b"}, 'without ".."'),
        ({"type": "s3", "bucket": "b", "target": "/x"}, "not supported on this node"),
    ],
)
def test_unusable_storage_is_a_sentence(
    layers: list[str], storage: dict[str, Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        build(layers, spec(storage=[storage]))


def test_read_only_root(layers: list[str]) -> None:
    assert build(layers, spec()).config["root"] == {"path": "rootfs", "readonly": False}
    assert build(layers, spec(read_only_root_fs=True)).config["root"]["readonly"] is True


# ---------------------------------------------------------------- linux


def test_resources_namespaces_and_cgroups_path(layers: list[str]) -> None:
    service = spec(resources={"cpu": 1.5, "memory": "256Mi", "pids_limit": 100})
    linux = build(layers, service).config["linux"]
    assert linux["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert linux["resources"]["memory"] == {"limit": 268435456, "swap": 268435456}
    assert linux["resources"]["pids"] == {"limit": 100}
    assert linux["cgroupsPath"] == "/zlayer/web-1"
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "mount", "ipc", "uts"]
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    assert "/proc/kcore" in linux["maskedPaths"]


def test_no_swap_accounting_means_no_swap_limit(layers: list[str]) -> None:
    host = HostFacts("/zlayer/web-1", swap_limit=False)
    linux = build(layers, spec(resources={"memory": "1Gi"}), host).config["linux"]
    assert linux["resources"]["memory"] == {"limit": 1 << 30}


def test_attachment_gives_the_network_namespace_and_resolvers(layers: list[str]) -> None:
    attachment = Attachment(
        container_id="web-1",
        netns="/run/netns/zl-web-1",
        interface="eth0",
        address="10.89.0.7",
        prefix_len=16,
        gateway="10.89.0.1",
        dns=["10.89.0.1"],
        search=["shop.zlayer.internal"],
        host_veth="zlv1",
        bridge="zl0",
    )
    result = build_bundle(
        spec(),
        image(layers, cmd=["x"]),
        attachment,
        {},
        ReplicaIds("web-1"),
        Path("/b/web-1"),
        Path("/v"),
        HOST,
    )
    namespaces = result.config["linux"]["namespaces"]
    assert {"type": "network", "path": "/run/netns/zl-web-1"} in namespaces
    assert mounts_by_target(result)["/sys"]["type"] == "sysfs"
    assert result.files["resolv.conf"] == "nameserver 10.89.0.1\nsearch shop.zlayer.internal\n"
    assert "10.89.0.7\tweb-1" in result.files["hosts"]


def test_annotations_and_privileged(layers: list[str]) -> None:
    config = build(layers, spec(labels={"team": "a"}, privileged=True)).config
    assert config["annotations"] == {
        "org.zlayer.container": "web-1",
        "org.zlayer.deployment": "shop",
        "org.zlayer.service": "web",
        "org.zlayer.instance": "1",
        "org.zlayer.revision": "3",
        "org.zlayer.label.team": "a",
    }
    assert config["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert "maskedPaths" not in config["linux"]


# ---------------------------------------------------------------- cgroups (pure parts)


def test_cgroups_layout_and_paths(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"31 23 0:28 / {root} rw - tmpfs tmpfs rw\n"
        f"35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory\n"
        f"36 31 0:33 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        f"40 31 0:37 / {root}/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        f"41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw\n"
    )
    layout = cgroups.detect_layout(root, mountinfo)
    assert layout.mode == "hybrid" and layout.hugetlb_on_v2
    assert layout.v1["cpuacct"] == root / "cpu,cpuacct"
    assert "name=systemd" in layout.v1 and "xattr" not in layout.v1
    assert cgroups.hugetlb_fix_command(root) == (
        f"mkdir -p {root}/hugetlb && mount -t cgroup -o hugetlb cgroup {root}/hugetlb"
    )
    assert cgroups.cgroups_path("web-1", "cgroupfs") == "/zlayer/web-1"
    assert cgroups.relative_dir("/zlayer/web-1", "cgroupfs") == "zlayer/web-1"
    assert cgroups.cgroups_path("web-1", "systemd") == "zlayer.slice:zlayer:web-1"
    assert cgroups.relative_dir("zlayer.slice:zlayer:web-1", "systemd") == (
        "zlayer.slice/zlayer-web-1.scope"
    )


def test_cgroup_stats_and_oom_from_v1_files(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    layout = cgroups.CgroupLayout("v1", {n: root / n for n in ("cpuacct", "memory", "pids")})
    rel = "zlayer/web-1"
    for name, files in {
        "cpuacct": {"cpuacct.usage": "2500000\n"},
        "memory": {
            "memory.usage_in_bytes": "10485760\n",
            "memory.limit_in_bytes": "9223372036854771712\n",
            "memory.stat": "cache 0\ntotal_inactive_file 1048576\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        },
        "pids": {"pids.current": "3\n", "pids.max": "max\n"},
    }.items():
        directory = root / name / rel
        directory.mkdir(parents=True)
        for file, text in files.items():
            (directory / file).write_text(text)
    stats, sample = cgroups.read_stats("web-1", layout, rel, None)
    assert (stats.cpu_usage_usec, stats.memory_bytes, stats.memory_limit_bytes) == (
        2500,
        9437184,
        None,
    )
    assert (stats.pids, stats.pids_limit) == (3, None)
    later = cgroups.CpuSample(sample.usage_usec - 1000, sample.at - 0.01)
    assert cgroups.read_stats("web-1", layout, rel, later)[0].cpu_percent > 0
    assert not cgroups.oom_killed(layout, rel)
    (root / "memory" / rel / "memory.oom_control").write_text("under_oom 0\noom_kill 1\n")
    assert cgroups.oom_killed(layout, rel)
    with pytest.raises(FileNotFoundError):
        cgroups.read_stats("gone", layout, "zlayer/gone", None)


# ---------------------------------------------------------------- namespaces, groups, init


def _namespaces(made: bundle.Bundle) -> set[str]:
    return {ns["type"] for ns in made.config["linux"]["namespaces"]}


def test_pid_and_ipc_modes_choose_the_namespaces(layers: list[str]) -> None:
    assert {"pid", "ipc", "mount", "uts"} <= _namespaces(build(layers, spec()))
    host_pid = _namespaces(build(layers, spec(pid_mode="host")))
    assert "pid" not in host_pid and "ipc" in host_pid
    host_ipc = _namespaces(build(layers, spec(ipc_mode="host", pid_mode="private")))
    assert "ipc" not in host_ipc and "pid" in host_ipc


def test_extra_groups_by_name_and_number_join_the_users_own(layers: list[str]) -> None:
    made = build(layers, spec(user="app", extra_groups=["audio", "4242", "wheel"]))
    # app is in wheel and audio by /etc/group already; each gid once.
    assert made.config["process"]["user"]["additionalGids"] == [10, 29, 4242]
    with pytest.raises(BundleError, match='the extra group "video" is not in the image'):
        build(layers, spec(extra_groups=["video"]))


def test_no_new_privileges_follows_privileged_and_security_opt(layers: list[str]) -> None:
    assert build(layers, spec()).config["process"]["noNewPrivileges"] is True
    assert build(layers, spec(privileged=True)).config["process"]["noNewPrivileges"] is False
    off = spec(security_opt=["no-new-privileges:false"])
    assert build(layers, off).config["process"]["noNewPrivileges"] is False


def test_init_container_runs_tini_as_pid_1(layers: list[str]) -> None:
    if bundle.INIT_BINARIES[0].is_file() is False and not bundle.INIT_BINARIES[1].is_file():
        with pytest.raises(BundleError, match="apt-get install tini"):
            build(layers, spec(init_container=True))
        return
    made = build(layers, spec(init_container=True, command={"args": ["serve"]}))
    args = made.config["process"]["args"]
    assert args[0] == bundle.INIT_TARGET and args[-2:] == ["--", "serve"]
    (mount,) = [m for m in made.config["mounts"] if m["destination"] == bundle.INIT_TARGET]
    assert "ro" in mount["options"] and Path(mount["source"]).is_file()


def test_cgroup_parent_per_manager() -> None:
    assert cgroups.cgroups_path("w-1", "cgroupfs", "/batch/x") == "/batch/x/w-1"
    path = cgroups.cgroups_path("w-1", "systemd", "zlayer-batch.slice")
    assert path == "zlayer-batch.slice:zlayer:w-1"
    assert (
        cgroups.relative_dir(path, "systemd") == "zlayer.slice/zlayer-batch.slice/zlayer-w-1.scope"
    )
    with pytest.raises(BundleError, match="not a systemd slice name"):
        cgroups.cgroups_path("w-1", "systemd", "/batch")
    with pytest.raises(BundleError, match="not a cgroup path"):
        cgroups.cgroups_path("w-1", "cgroupfs", "/../etc")


def test_a_bundle_without_an_overlay_root_is_laid_out_with_an_empty_unmounted_root(
    tmp_path: Path,
) -> None:
    from daemons.agentd import bundle_files

    plan = bundle.Bundle(
        config={"process": {"user": {"uid": 0, "gid": 0}}},
        files={"hostname": "web-1\n"},
        directories=[],
        named_volumes=[],
        overlay_root=False,
    )
    bundle_dir = tmp_path / "web-1"
    # no layers to mount: an overlay mount would fail on these, and is not tried
    bundle_files.lay_out(bundle_dir, {}, plan, ["/nonexistent/layer"])
    rootfs = bundle_dir / "rootfs"
    assert rootfs.is_dir() and list(rootfs.iterdir()) == []
    assert not bundle_files._is_mounted(rootfs)
    assert (bundle_dir / "hostname").read_text() == "web-1\n"
