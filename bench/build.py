"""Image build time: ``zlayerctl build`` against plain ``buildah bud`` of the same Dockerfile.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix, writes a small multi-stage Dockerfile on the busybox test
image (``FROM oci-archive:...``: nothing is pulled), and times, in turns:

- zlayer: ``zlayerctl build CONTEXT -t NAME`` wall time: the request over the
  bus, registryd's buildah run, following the log, exporting the image and
  importing it into the image store (so ``zlayerctl up`` can use it); the
  figure under test.
- buildah: ``buildah bud`` of the same Dockerfile with the same flags
  (overlay, chroot isolation, host network, --layers) into a storage root of
  its own under the prefix; the peer. Its image stays in buildah's storage.

Both are measured twice over: every step rebuilt (``--no-cache``) and a
rebuild where every step is cached. Prints p50 of each and the ratio to
buildah, for zlayerctl's wall time (Python start-up and log following
included) and for the build as registryd times it (buildah, export, import).

Run (root, buildah and busybox-static installed): ``.venv/bin/python bench/build.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, running_daemons

from ctl.supervisor import find_executable
from shared.busybox_image import busybox_image, write_oci_archive

DOCKERFILE = """\
FROM {base} AS build
ARG VERSION=1
RUN mkdir -p /out && echo "version $VERSION" > /out/version
COPY payload.txt /out/payload.txt
RUN wc -c /out/payload.txt > /out/size

FROM {base}
COPY --from=build /out /srv
RUN echo ok > /srv/ok
CMD ["cat", "/srv/version"]
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr.strip()[-500:]}")
    return elapsed, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="builds of each kind per tool")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        print("needs root and buildah (apt-get install buildah)", file=sys.stderr)
        return 2

    with running_daemons() as cluster:
        work = cluster.paths.prefix / "bench-build"
        context = work / "context"
        context.mkdir(parents=True)
        archive = write_oci_archive(busybox_image(), work / "busybox.tar")
        (context / "Dockerfile").write_text(DOCKERFILE.format(base=f"oci-archive:{archive}"))
        (context / "payload.txt").write_text("x" * 100_000)
        results = measure(cluster, context, work, args.runs)

    print(
        f"{'build':<20}{'zlayerctl p50':>14}{'in registryd p50':>18}{'buildah p50':>13}"
        f"{'ratio':>7}{'ratio (registryd)':>19}"
    )
    for kind, (wall, inside, peer) in results.items():
        z, d, b = statistics.median(wall), statistics.median(inside), statistics.median(peer)
        print(
            f"{kind:<20}{z * 1000:>12.0f}ms{d * 1000:>16.0f}ms{b * 1000:>11.0f}ms"
            f"{z / b:>6.2f}x{d / b:>18.2f}x"
        )
    return 0


def measure(
    cluster: Cluster, context: Path, work: Path, runs: int
) -> dict[str, tuple[list[float], list[float], list[float]]]:
    buildah_root = work / "peer"
    env = {**cluster.env, "TMPDIR": str(work / "tmp")}
    (work / "tmp").mkdir()
    peer = [
        "buildah", "--root", str(buildah_root / "storage"), "--runroot", str(buildah_root / "run"),
        "--storage-driver", "overlay", "bud", "--isolation", "chroot", "--network", "host",
        "--layers", "--quiet",
    ]  # fmt: skip
    zlayer = [find_executable("zlayerctl"), "build", str(context), "--format", "json"]
    results: dict[str, tuple[list[float], list[float], list[float]]] = {}
    # One of each first: both import the base image into their storage once.
    timed([*zlayer, "-t", "bench:warm"], env)
    timed([*peer, "-t", "bench:warm", str(context)], env)
    for kind, extra in (("every step rebuilt", ["--no-cache"]), ("every step cached", [])):
        wall: list[float] = []
        inside: list[float] = []
        theirs: list[float] = []
        for run in range(runs):
            elapsed, out = timed([*zlayer, *extra, "-t", f"bench:{run}"], env)
            wall.append(elapsed)
            inside.append(float(json.loads(out)["seconds"]))
            theirs.append(timed([*peer, *extra, "-t", f"bench:{run}", str(context)], env)[0])
        results[kind] = (wall, inside, theirs)
    return results


if __name__ == "__main__":
    sys.exit(main())
