"""zlayerctl's start-up time against podman's (or docker's) in the same run.

Times whole processes, as a user runs them, on the same machine in the same
run, in two groups. Without daemons:

- ``zlayerctl --help``: the interpreter, click and the command table, no
  command module loaded (commands load lazily); the floor of every command;
- ``zlayerctl validate FILE``: a real command, which also loads the
  deployment spec models (pydantic) and the YAML loader, and reads FILE;
  with the daemons running (below) it is timed again, where schedd, which
  has the models loaded, checks FILE (``Scheduler1.Validate``), beside the
  same command made to check it itself, and the peer, in the same run;
  ``zlayerctl up -b IDLE`` there too: the command's own cost (a spec of one
  service of 0 replicas: each run stores a revision and nothing starts);
- the peer, ``podman --version`` (``docker --version`` where podman is not
  installed): a Go binary doing the least a CLI can do;
- the interpreter's floor, in both groups: ``python -S -c pass`` (no site),
  ``python -c pass`` (the installed environment's site) and ``python -I -c
  "import jeepney"`` (the bus library every read command loads), with the
  Python zlayerctl runs on: what no change to zlayerctl can cut.

With the six daemons running (started by this benchmark under a throwaway
prefix, see ``_cluster.py``), the read commands, each one bus round trip or a
few and a table on stdout (piped, so plain text):

- ``zlayerctl ps``, ``status``, ``routes``, ``dns``, ``image ls`` and
  ``events -n 5``;
- the peer, ``podman ps`` (``docker ps``): a Go client asking its own
  store for the containers.

``--no-daemons`` skips the second group.

zlayerctl is timed as users run it: installed, not editable. The benchmark
builds this tree's wheel (``pip wheel``, isolated, as ``packaging/stage.sh``'s
``pip install`` builds it) and installs it, without dependencies, into a
throwaway virtual environment of the same base interpreter, its modules
byte-compiled (as they are once root has run them from the package); a ``.pth`` line
there puts this interpreter's site-packages on the path for the
dependencies, as a directory only, so the development checkout's
editable-install finder (which imports pathlib, ~20 ms a start) is not
loaded. ``--editable`` times the checkout's own ``zlayerctl`` instead.

With hyperfine on PATH (``apt-get install hyperfine``) it runs them with
``hyperfine -N`` (no shell between), ``--warmup`` runs first; without it, a
Python loop spawns each process in turn (the ways taking turns, so background
load lands on all of them alike). Prints the median and p90 in milliseconds
of each and the ratio of each median to its group's peer.

    .venv/bin/python bench/startup.py [--runs N] [--warmup N] [--file SPEC]
                                      [--no-hyperfine] [--no-daemons] [--editable]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, percentile, print_table, running_daemons

from ctl.supervisor import find_executable
from shared.busybox_image import BUSYBOX, busybox_image, write_all

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO / "examples" / "static-web.zlayer.yml"


# The read commands timed with the daemons running: (name, arguments).
READ_COMMANDS: list[tuple[str, list[str]]] = [
    ("zlayerctl ps", ["ps"]),
    ("zlayerctl status", ["status"]),
    ("zlayerctl routes", ["routes"]),
    ("zlayerctl dns", ["dns"]),
    ("zlayerctl image ls", ["image", "ls"]),
    ("zlayerctl events -n 5", ["events", "-n", "5"]),
]


# `up -b` timed on its own: a revision stored, nothing to start (replica_start.py times
# it to a running replica)
IDLE_SPEC = """\
version: v1
deployment: idle
services:
  web:
    image: zlayer/busybox:latest
    scale: {mode: fixed, replicas: 0}
"""

# What the wheel is built from: the project's metadata and its packages.
SOURCES = ("pyproject.toml", "README.md", "shared", "daemons", "ctl")


@contextlib.contextmanager
def packaged_zlayerctl() -> Iterator[str]:
    """``zlayerctl`` of this tree installed from its wheel into a throwaway venv."""
    with tempfile.TemporaryDirectory(prefix="zlstartup-venv-") as directory:
        root = Path(directory)
        source = root / "src"
        source.mkdir()
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, source / name)
        quiet = ["--quiet", "--disable-pip-version-check"]
        pip = [sys.executable, "-m", "pip", *quiet]
        subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", str(root / "wheel"), str(source)], check=True
        )
        venv = root / "venv"
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        wheels = [str(w) for w in (root / "wheel").glob("*.whl")]
        subprocess.run(
            [*pip, "--python", str(python), "install", "--no-deps", *wheels],
            check=True,
        )
        # The dependencies: this interpreter's site-packages as a plain directory (its .pth
        # files, the editable finder among them, are not run).
        found = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        )
        ours = sysconfig.get_paths()["purelib"]
        Path(found.stdout.strip(), "_zlayer_bench_dependencies.pth").write_text(ours + "\n")
        yield str(venv / "bin" / "zlayerctl")


def floor_commands(zlayerctl: str) -> dict[str, list[str]]:
    """The interpreter zlayerctl runs on, doing nothing, then importing the bus library."""
    python = str(Path(zlayerctl).parent / "python")
    return {
        "python -S -c pass (floor)": [python, "-S", "-c", "pass"],
        "python -c pass (floor)": [python, "-c", "pass"],
        'python -I -c "import jeepney"': [python, "-I", "-c", "import jeepney"],
    }


def peer_executable() -> str:
    """podman, else docker."""
    for name in ("podman", "docker"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("neither podman nor docker is installed: there is no peer to compare with")


def check(commands: dict[str, list[str]], env: Mapping[str, str] | None = None) -> None:
    """Run each command once; stop with its output if one fails."""
    for name, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()
            raise SystemExit(f"{name} exited with {result.returncode}: {said}")


def with_hyperfine(
    hyperfine: str,
    commands: dict[str, list[str]],
    runs: int,
    warmup: int,
    env: Mapping[str, str] | None = None,
) -> dict[str, list[float]]:
    """Samples in ms per command, from ``hyperfine -N --export-json``."""
    with tempfile.TemporaryDirectory(prefix="zlstartup-bench-") as directory:
        report = Path(directory) / "hyperfine.json"
        subprocess.run(
            [
                hyperfine,
                "-N",
                "--style",
                "none",
                "--warmup",
                str(warmup),
                "--runs",
                str(runs),
                "--export-json",
                str(report),
                *(shlex.join(command) for command in commands.values()),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        results = json.loads(report.read_text())["results"]
    return {
        name: [seconds * 1000 for seconds in result["times"]]
        for name, result in zip(commands, results, strict=True)
    }


def with_loop(
    commands: dict[str, list[str]],
    runs: int,
    warmup: int,
    env: Mapping[str, str] | None = None,
) -> dict[str, list[float]]:
    """Samples in ms per command, spawning each in turn."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for index in range(warmup + runs):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True, env=env)
            if index >= warmup:
                samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def measure(
    commands: dict[str, list[str]],
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
) -> dict[str, list[float]]:
    """Check, then time ``commands`` with hyperfine or the loop."""
    check(commands, env)
    hyperfine = None if args.no_hyperfine else shutil.which("hyperfine")
    if hyperfine:
        return with_hyperfine(hyperfine, commands, args.runs, args.warmup, env)
    return with_loop(commands, args.runs, args.warmup, env)


def report(title: str, samples: dict[str, list[float]], peer_name: str) -> None:
    """Median, p90 and the ratio of each median to the peer's."""
    print(title)
    peer_median = statistics.median(samples[peer_name])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append(
            [
                name,
                str(len(values)),
                f"{median:.1f}",
                f"{percentile(values, 90):.1f}",
                f"{median / peer_median:.1f}x",
            ]
        )
    print_table(["what", "runs", "median ms", "p90 ms", "vs peer"], rows)


# What the read commands find: an image named as pulled from a registry, and a deployment
# (of no replica: nothing runs, the table has its rows)
STOCK_IMAGE = "127.0.0.1:5000/bench/busybox:1"


def stock(cluster: Cluster) -> None:
    """Give the read commands something to print (a store with nothing in it would let a
    command skip its table's rendering): a deployment, and with busybox-static an image."""
    idle = cluster.paths.prefix / "stock.zlayer.yml"
    idle.write_text(IDLE_SPEC.replace("deployment: idle", "deployment: stock"))
    steps = [["up", "-b", str(idle)]]
    if BUSYBOX.exists():
        written = write_all(busybox_image(STOCK_IMAGE), cluster.paths.prefix / "stock-image")
        steps.append(["image", "import", str(written["oci"])])
    for step in steps:
        done = cluster.zlayerctl(*step)
        if done.returncode != 0:
            sys.exit(f"zlayerctl {shlex.join(step)} failed: {done.stderr.strip()}")
    if not BUSYBOX.exists():
        print("no /bin/busybox (apt-get install busybox-static): image ls lists none")


def run_all(
    zlayerctl: str, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]], str, str]:
    """Every group timed: (samples, read samples, validate's with the daemons running,
    the read peer's name, the peer's name)."""
    peer = peer_executable()
    peer_name = f"{Path(peer).name} --version (peer)"
    commands = {
        "zlayerctl --help": [zlayerctl, "--help"],
        "zlayerctl validate FILE": [zlayerctl, "validate", args.file],
        peer_name: [peer, "--version"],
        **floor_commands(zlayerctl),
    }
    samples = measure(commands, args)

    read_samples: dict[str, list[float]] = {}
    check_samples: dict[str, list[float]] = {}
    read_peer_name = f"{Path(peer).name} ps (peer)"
    if not args.no_daemons:
        try:
            with running_daemons() as cluster:
                stock(cluster)
                reads = {name: [zlayerctl, *argv] for name, argv in READ_COMMANDS}
                reads[read_peer_name] = [peer, "ps"]
                reads.update(floor_commands(zlayerctl))
                read_samples = measure(reads, args, cluster.env)
                # validate where schedd answers (root: it checks the spec), beside the
                # same command checking the file itself (no bus), and the peer
                nowhere = f"ZLAYER_BUS_ADDRESS=unix:path={cluster.paths.prefix}/no-bus"
                # up -b's own cost: each run stores a revision of a service of 0 replicas
                idle = cluster.paths.prefix / "idle.zlayer.yml"
                idle.write_text(IDLE_SPEC)
                checks = {
                    "zlayerctl validate FILE, schedd checks": [zlayerctl, "validate", args.file],
                    "zlayerctl validate FILE, checked here": [
                        "env",
                        nowhere,
                        zlayerctl,
                        "validate",
                        args.file,
                    ],
                    "zlayerctl up -b IDLE": [zlayerctl, "up", "-b", str(idle)],
                    peer_name: [peer, "--version"],
                }
                check_samples.update(measure(checks, args, cluster.env))
        except KeyboardInterrupt:
            print("interrupted; daemons stopped", file=sys.stderr)
            sys.exit(130)
    return samples, read_samples, check_samples, read_peer_name, peer_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs of each first")
    parser.add_argument("--file", default=str(DEFAULT_SPEC), help="the spec `validate` reads")
    parser.add_argument(
        "--no-hyperfine", action="store_true", help="time with a Python loop even with hyperfine"
    )
    parser.add_argument(
        "--no-daemons", action="store_true", help="skip the read commands (they start the daemons)"
    )
    parser.add_argument(
        "--editable",
        action="store_true",
        help="time the checkout's editable zlayerctl, not an installed one",
    )
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.editable:
            zlayerctl = find_executable("zlayerctl")
        else:
            zlayerctl = stack.enter_context(packaged_zlayerctl())
        samples, read_samples, check_samples, read_peer_name, peer_name = run_all(zlayerctl, args)

    hyperfine = not args.no_hyperfine and shutil.which("hyperfine")
    print(f"timed with {'hyperfine -N' if hyperfine else 'a Python loop of subprocess runs'}")
    print(
        "zlayerctl: "
        + ("the checkout's editable install" if args.editable else "installed from its wheel")
    )
    spec = Path(args.file).resolve()
    print(f"FILE = {spec.relative_to(REPO) if spec.is_relative_to(REPO) else spec}")
    report("without daemons", samples, peer_name)
    if read_samples:
        print()
        report("read commands, six daemons running", read_samples, read_peer_name)
    if check_samples:
        print()
        report("validate and up -b, six daemons running", check_samples, peer_name)


if __name__ == "__main__":
    main()
