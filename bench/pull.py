"""Pull of a multi-layer image from a local registry: ZLayer against skopeo, same run.

The bench starts Debian's docker-registry on a free port and pushes into it
(with skopeo) an image of ``--layers`` layers, each ``--layer-mb`` MB of
random data (gzip cannot shrink it) on top of busybox. Then, ``--runs``
times, taking turns:

cold   ZLayer: ``zlayerctl pull IMAGE`` into an empty store (the image was
       removed with ``image rm`` first, which deletes its blobs and layers):
       manifest, blobs downloaded and verified, layers unpacked, image named.
       skopeo: ``skopeo copy docker://IMAGE oci:DIR`` into an empty DIR:
       manifest and blobs downloaded and verified, nothing unpacked.
warm   ZLayer: the same ``zlayerctl pull`` again with the image stored: the
       registry is asked for the manifest, every blob is found in the store.
       skopeo: the same copy again into the DIR that already holds every blob
       (skopeo reuses blobs the destination has).

Both are timed as whole processes, as a user runs them: zlayerctl installed
from this tree's wheel, its modules byte-compiled, as ``startup.py`` times it
(``--editable``: the checkout's own, whose editable-install finder costs
every start about 20 ms more; its modules are byte-compiled first). The
daemons are the checkout's. The figure is the
median; the ratio is ZLayer's over skopeo's (below 1: ZLayer is faster).
Two more rows say where ZLayer's time goes: registryd's part alone (each
pull job's start to end, as the daemon recorded it) beside the same skopeo
figures; the rest is zlayerctl starting and waiting for the job.

A second table gives the CPU time each pull cost (user + system: zlayerctl's
process and registryd's share, against skopeo's process), which other work
on a busy machine moves far less than the wall time.

    .venv/bin/python bench/pull.py [--runs N] [--layers N] [--layer-mb MB] [--editable]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cluster import Cluster, print_table, running_daemons
from bench.startup import packaged_zlayerctl
from ctl.supervisor import find_executable
from shared import busybox_image as builder
from shared.bus import open_bus, resolve_bus_address
from shared.clients import RegistryClient
from shared.wire.jobs import JobInfo
from tests.registry_fixture import skopeo_copy, start_registry


def children_cpu() -> float:
    """CPU seconds (user + system) of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    command: list[str], env: dict[str, str] | None = None, also: int | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``command``; the CPU of process ``also`` added."""
    cpu = children_cpu() + (process_cpu(also) if also else 0.0)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    elapsed = time.perf_counter() - started
    cpu = children_cpu() + (process_cpu(also) if also else 0.0) - cpu
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {result.stderr.strip()}")
    return elapsed, cpu


def make_layers(count: int, size_mb: int) -> list[bytes]:
    layers = [builder.make_tar(builder.busybox_entries())]
    for number in range(count):
        layers.append(
            builder.make_tar(
                [builder.Entry(f"data{number}", "file", os.urandom(size_mb << 20), mode=0o644)]
            )
        )
    return layers


def measure(cluster: Cluster, zlayerctl: str, image: str, work: Path, runs: int) -> None:
    ctl = [zlayerctl]
    skopeo = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--quiet"]
    results: dict[str, list[float]] = {k: [] for k in ("zc", "sc", "zw", "sw")}
    cpu: dict[str, list[float]] = {k: [] for k in results}
    registryd = cluster.state.daemons["registryd"].pid
    for run in range(runs):
        cluster.zlayerctl("image", "rm", "--force", image)
        target = work / f"oci-{run}"
        for key, command, env, also in (
            ("zc", [*ctl, "pull", image, "--format", "json"], cluster.env, registryd),
            ("sc", [*skopeo, f"docker://{image}", f"oci:{target}"], None, None),
            ("zw", [*ctl, "pull", image, "--format", "json"], cluster.env, registryd),
            ("sw", [*skopeo, f"docker://{image}", f"oci:{target}"], None, None),
        ):
            wall, used = timed(command, env, also)
            results[key].append(wall)
            cpu[key].append(used)
        shutil.rmtree(target, ignore_errors=True)
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    jobs = pull_job_seconds(cluster)[-2 * runs :]  # cold, warm, cold, warm, ...

    def row(what: str, ours: list[float], peer: list[float]) -> list[str]:
        a, b = statistics.median(ours), statistics.median(peer)
        return [what, f"{a * 1000:.0f} ms", f"{b * 1000:.0f} ms", f"{a / b:.2f}"]

    print_table(
        ["pull", "zlayer (median)", "skopeo (median)", "ratio zlayer/skopeo"],
        [
            row("cold: empty store / empty dir", results["zc"], results["sc"]),
            row("warm: every blob already here", results["zw"], results["sw"]),
            row("  cold, registryd's job alone", jobs[0::2], results["sc"]),
            row("  warm, registryd's job alone", jobs[1::2], results["sw"]),
        ],
    )
    print()
    print_table(
        ["CPU time", "zlayerctl + registryd", "skopeo", "ratio zlayer/skopeo"],
        [
            row("cold: empty store / empty dir", cpu["zc"], cpu["sc"]),
            row("warm: every blob already here", cpu["zw"], cpu["sw"]),
        ],
    )


def pull_job_seconds(cluster: Cluster) -> list[float]:
    """How long each pull job registryd still remembers took, oldest first."""

    async def listed() -> list[JobInfo]:
        bus = open_bus(resolve_bus_address(cluster.paths))
        try:
            return await RegistryClient(bus).list_jobs()
        finally:
            bus.close()

    jobs = sorted(asyncio.run(listed()), key=lambda job: job.id)
    return [
        job.finished_at - job.started_at
        for job in jobs
        if job.kind == "pull" and job.finished_at is not None
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--layer-mb", type=int, default=4)
    parser.add_argument(
        "--editable",
        action="store_true",
        help="time the checkout's editable zlayerctl, not one installed from its wheel",
    )
    args = parser.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="zlbench-pull-"))
    registry = None
    stack = contextlib.ExitStack()
    try:
        if args.editable:
            zlayerctl = find_executable("zlayerctl")
            # as an installed package has them: with PYTHONDONTWRITEBYTECODE set, each run
            # would compile every module changed since its last .pyc
            root = Path(__file__).resolve().parent.parent
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(root / "ctl"), str(root / "shared")],
                check=True,
            )
        else:
            zlayerctl = stack.enter_context(packaged_zlayerctl())
        layers = make_layers(args.layers, args.layer_mb)
        layout = builder.write_oci_layout(
            builder.make_image(layers, "localhost/bench:1"), work / "layout"
        )
        registry = start_registry()
        image = f"{registry.host}/bench/layers:1"
        skopeo_copy(f"oci:{layout}", f"docker://{image}")
        total = sum(len(layer) for layer in layers) / 1e6
        print(
            f"image: {len(layers)} layers, {total:.0f} MB uncompressed, "
            f"from a local docker-registry; {args.runs} runs each; zlayerctl "
            + ("the checkout's editable install" if args.editable else "installed from its wheel"),
        )
        with running_daemons() as cluster:
            measure(cluster, zlayerctl, image, work, args.runs)
    finally:
        stack.close()
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
