"""Restarts under load: what each daemon's crash or restart costs the traffic.

Starts the six daemons with ``zlayerctl daemon run --detach`` under a fresh
temporary prefix (``_cluster.running_daemons``: free ports, a private bus, a
network of its own), imports the busybox test image and deploys two busybox
``httpd`` replicas with an http endpoint (proxyd listens on the endpoint's
port) and a public tcp endpoint (nftables DNAT). Then two measurements:

1. **Requests lost to a restart.** Three client loops run all the time, one
   request after another, each on a new connection: HTTP through proxyd, HTTP
   through the published tcp port (the kernel path, overlayd's nft rules), and
   a UDP query for ``web.service.local`` to overlayd's service DNS on the
   bridge's address. For each daemon in turn: ``kill -9`` of the PID ``zlayerctl
   status`` reports, and then a graceful restart, SIGTERM to that PID, after
   which the supervisor starts it again (it waits 0.5 s before restarting a
   daemon, doubled for one that ran less than a minute). A window runs from the
   signal until the daemon is back (``running`` with a new PID in the
   supervisor's state) plus ``--settle`` seconds; every request that ended in
   it is counted: refused connections, other failures (reset, timeout, an
   answer that is not 200 or has no address), and the rest.

   **Peer:** nginx (``worker_processes 1``) as a reverse proxy to the same two
   replicas, ``nginx -s reload`` under the same HTTP loop, the window from the
   reload until nginx's new worker answers, plus the same settle time: the
   graceful restart every operator knows, which loses nothing.

2. **Adoption of 20 running replicas.** A deployment of 20 httpd replicas
   (health checked every second), all healthy; ``zlayerctl daemon stop``
   (replicas keep running); then ``zlayerctl daemon run --detach`` and the time
   until the six daemons are ready, until agentd lists all 20 running and
   healthy with the PIDs they had (adopted, not restarted), and until
   proxyd's route has all 20 as backends and requests through it succeed.
   **Peer:** the same start of the six daemons with nothing deployed, in the
   same run (the floor adoption adds to).

Clean-up, also on an error, Ctrl-C or SIGTERM: the deployments taken down,
nginx stopped by PID, the daemons stopped, containers left under agentd's
runtime root removed by id, mounts under the prefix unmounted, overlayd's
bridge and nft table removed, temporary directories. Nothing is killed by name.

Needs root (containers), crun, conmon, busybox-static and nginx.

Run: ``.venv/bin/python bench/restart.py`` (about 5 minutes; ``--settle S``,
``--adopt-runs N``, ``--replicas N``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import Cluster, print_table, running_daemons
from proxy_http import nginx_conf, stop_process, wait_port
from replica_start import IP_FORWARD, free_subnets, unmount_under, zlayer_leftovers

from ctl.supervisor import SupervisorState, find_executable
from shared.busybox_image import busybox_image, write_oci_layout
from shared.paths import Paths

IMAGE = "zlayer/busybox:latest"
DAEMONS = ("schedd", "agentd", "registryd", "overlayd", "proxyd", "apid")
HTTPD = "mkdir -p /www && echo hello-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"
BACK_TIMEOUT = 60.0
CLIENT_TIMEOUT = 10.0  # an HTTP client's patience, connect to last byte
DNS_TIMEOUT = 5.0  # glibc's resolver waits 5 s before it tries again
ADOPT_TIMEOUT = 240.0

SPEC = """\
version: v1
deployment: {name}
services:
  web:
    image: {image}
    command:
      entrypoint: [sh, -c]
      args: ["{httpd}"]
    endpoints:
      - {{name: http, protocol: http, port: {http_port}, target_port: 8080, expose: public}}
      - {{name: raw, protocol: tcp, port: {tcp_port}, target_port: 8080, expose: public}}
    scale: {{mode: fixed, replicas: {replicas}}}
    stop_signal: SIGKILL
    health:
      interval: 1s
      timeout: 1s
      retries: 1
      check: {{type: http, url: /index.html}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- clients


def http_once(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("GET", "/index.html")
        response = conn.getresponse()
        response.read()
        return "ok" if response.status == 200 else "failed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except (OSError, http.client.HTTPException):
        return "failed"
    finally:
        conn.close()


def dns_query(name: str) -> bytes:
    from dnslib import DNSRecord

    return bytes(DNSRecord.question(name).pack())


def dns_once(server: str, port: int, query: bytes) -> str:
    from dnslib import DNSRecord

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_TIMEOUT)
        try:
            sock.sendto(query, (server, port))
            data, _ = sock.recvfrom(4096)
        except ConnectionRefusedError:  # ICMP port unreachable: nothing listens
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError:
            return "failed"
    reply = DNSRecord.parse(data)
    return "ok" if reply.rr else "failed"


class Loop(threading.Thread):
    """One request after another; each outcome with the time it ended."""

    def __init__(self, name: str, once: Callable[[], str]) -> None:
        super().__init__(daemon=True, name=name)
        self.once = once
        self.outcomes: list[tuple[float, str, float]] = []  # (ended, outcome, seconds)
        self.stopping = threading.Event()
        self.paused = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.paused.is_set():
                time.sleep(0.05)
                continue
            began = time.monotonic()
            outcome = self.once()
            ended = time.monotonic()
            self.outcomes.append((ended, outcome, ended - began))
            time.sleep(0.01)

    def between(self, start: float, end: float) -> Counter[str]:
        return Counter(o for t, o, _ in list(self.outcomes) if start <= t <= end)

    def longest(self, start: float, end: float) -> float:
        """The longest request that ended in the window, in seconds."""
        return max((d for t, _, d in list(self.outcomes) if start <= t <= end), default=0.0)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


@contextlib.contextmanager
def loops(**onces: Callable[[], str]) -> Iterator[dict[str, Loop]]:
    started = {name: Loop(name, once) for name, once in onces.items()}
    for loop in started.values():
        loop.start()
    try:
        yield started
    finally:
        for loop in started.values():
            loop.stop()


# ---------------------------------------------------------------- the daemons


def daemon_pid(paths: Paths, name: str) -> tuple[int, str]:
    state = SupervisorState.read(paths)
    if state is None or name not in state.daemons:
        return 0, "gone"
    child = state.daemons[name]
    return child.pid, child.state


def wait_back(paths: Paths, name: str, old_pid: int) -> float:
    """monotonic() when the supervisor has the daemon running again with a new PID."""
    deadline = time.monotonic() + BACK_TIMEOUT
    while time.monotonic() < deadline:
        pid, state = daemon_pid(paths, name)
        if state == "running" and pid not in (0, old_pid):
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"zlayer-{name} was not running again {BACK_TIMEOUT:.0f}s after its end")


def ctl_json(cluster: Cluster, *args: str) -> Any:
    result = cluster.zlayerctl(*args, "--format", "json")
    if result.returncode != 0:
        raise RuntimeError(f"zlayerctl {' '.join(args)}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def must(cluster: Cluster, *args: str, timeout: float = 120.0) -> None:
    result = cluster.zlayerctl(*args, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"zlayerctl {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Window:
    what: str
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    back: float = 0.0  # seconds until the daemon (or nginx's new worker) was back
    longest: float = 0.0  # the longest HTTP request through the proxy in the window


def signal_window(
    cluster: Cluster, running: dict[str, Loop], name: str, signum: int, settle: float
) -> Window:
    pid, state = daemon_pid(cluster.paths, name)
    if state != "running" or pid <= 0:
        raise RuntimeError(f"zlayer-{name} is {state}, not running")
    time.sleep(settle)  # a quiet stretch before, so the previous window's tail is over
    start = time.monotonic()
    os.kill(pid, signum)
    back = wait_back(cluster.paths, name, pid)
    end = back + settle
    time.sleep(max(0.0, end - time.monotonic()))
    how = "kill -9" if signum == signal.SIGKILL else "SIGTERM, restarted"
    window = Window(f"zlayer-{name}: {how}", back=back - start)
    window.counts = {k: loop.between(start, end) for k, loop in running.items()}
    window.longest = running["proxyd http"].longest(start, end)
    return window


# ---------------------------------------------------------------- nginx, the peer


@contextlib.contextmanager
def nginx_proxy(root: Path, addresses: list[str], port: int) -> Iterator[Path]:
    root.mkdir(parents=True)
    root.chmod(0o755)
    servers = "\n".join(f"        server {a}:8080;" for a in addresses)
    body = f"""
    upstream backends {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(root, body))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield conf
    finally:
        stop_process(process)


def nginx_workers(root: Path) -> set[int]:
    master = int((root / "nginx.pid").read_text())
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True, check=False
    )
    return {int(p) for p in out.stdout.split()}


def nginx_reload_window(conf: Path, loop: Loop, settle: float) -> Window:
    root = conf.parent
    before = nginx_workers(root)
    time.sleep(settle)
    start = time.monotonic()
    subprocess.run(
        ["nginx", "-c", str(conf), "-p", str(root), "-s", "reload"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    deadline = start + BACK_TIMEOUT
    while not (nginx_workers(root) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    back = time.monotonic()
    end = back + settle
    time.sleep(max(0.0, end - time.monotonic()))
    window = Window("nginx -s reload (peer)", back=back - start)
    window.counts = {"proxyd http": loop.between(start, end)}
    window.longest = loop.longest(start, end)
    return window


# ---------------------------------------------------------------- part 2: adoption


def _ratio(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


class AdoptionError(RuntimeError):
    """A replica that was running came back as a new process."""


def replicas_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    rows = ctl_json(cluster, "ps", "--containers", "-d", name)
    return [r for r in rows if r["deployment"] == name]


def start_daemons(cluster: Cluster) -> float:
    started = time.monotonic()
    must(cluster, "daemon", "run", "--detach")
    return time.monotonic() - started


def adopt_once(cluster: Cluster, name: str, http_port: int, replicas: int) -> dict[str, float]:
    before = {r["id"]: r["pid"] for r in replicas_of(cluster, name) if r["state"] == "running"}
    if len(before) != replicas:
        raise RuntimeError(f"{len(before)} of {replicas} replicas run before the stop")
    must(cluster, "daemon", "stop")
    for cid, pid in before.items():
        if not Path(f"/proc/{pid}").exists():
            raise RuntimeError(f"{cid} (pid {pid}) ended when the daemons stopped")
    started = time.monotonic()
    # Polled from the moment the start is asked for: adoption may finish before
    # `daemon run --detach` says the six are ready, or after.
    starting = subprocess.Popen(
        [find_executable("zlayerctl"), "daemon", "run", "--detach"],
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    figures: dict[str, float] = {}

    def wait_ready() -> None:
        if starting.wait() == 0:
            figures["ready"] = time.monotonic() - started

    waiter = threading.Thread(target=wait_ready, daemon=True)
    waiter.start()
    deadline = started + ADOPT_TIMEOUT
    while len(figures) < 3:
        if time.monotonic() > deadline:
            starting.kill()
            raise TimeoutError(f"not adopted and serving after {ADOPT_TIMEOUT:.0f}s: {figures}")
        if starting.poll() not in (None, 0):
            error = starting.stderr.read() if starting.stderr else ""
            raise RuntimeError(f"zlayerctl daemon run --detach: {error.strip()}")
        if "adopted" not in figures:
            rows: list[dict[str, Any]] = []
            with contextlib.suppress(RuntimeError, ValueError):  # agentd not answering yet
                rows = replicas_of(cluster, name)
            for r in rows:
                if r["state"] == "running" and r["pid"] and before.get(r["id"]) != r["pid"]:
                    raise AdoptionError(
                        f"{r['id']} runs with pid {r['pid']}, not {before.get(r['id'])}: "
                        "restarted or replaced, not adopted"
                    )
            same = {
                r["id"]
                for r in rows
                if r["state"] == "running"
                and r["health"] == "healthy"
                and before.get(r["id"]) == r["pid"]
            }
            if same == set(before):
                figures["adopted"] = time.monotonic() - started  # seen by then
        if "serving" not in figures:
            with contextlib.suppress(RuntimeError, ValueError):
                routes = [r for r in ctl_json(cluster, "routes") if r["deployment"] == name]
                full = routes and all(len(r["backends"]) == replicas for r in routes)
                if full and all(http_once(http_port) == "ok" for _ in range(10)):
                    figures["serving"] = time.monotonic() - started
        time.sleep(0.1)
    return figures


# ---------------------------------------------------------------- the run


def measure(cluster: Cluster, work: Path, args: argparse.Namespace) -> None:
    oci = write_oci_layout(busybox_image(), work / "oci")
    must(cluster, "image", "import", str(oci), "--name", IMAGE)
    name = f"rst{os.getpid() % 10000}"
    http_port, tcp_port, peer_port = free_port(), free_port(), free_port()
    spec = work / f"{name}.zlayer.yml"
    spec.write_text(
        SPEC.format(
            name=name,
            image=IMAGE,
            httpd=HTTPD,
            http_port=http_port,
            tcp_port=tcp_port,
            replicas=2,
        )
    )
    must(cluster, "up", "-d", str(spec), "--timeout", "120", timeout=180)
    addresses = [r["address"] for r in replicas_of(cluster, name)]
    from daemons.overlayd.settings import OverlaySettings

    overlay = OverlaySettings.load("overlayd", cluster.paths)
    gateway = str(overlay.subnet.network_address + 1)
    query = dns_query("web.service.local")

    def raw_once() -> str:
        try:
            with socket.create_connection(("127.0.0.1", tcp_port), CLIENT_TIMEOUT) as sock:
                sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                data = sock.recv(4096)
            return "ok" if data.startswith(b"HTTP/1.") and b" 200 " in data[:20] else "failed"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError:
            return "failed"

    windows: list[Window] = []
    with nginx_proxy(work / "nginx", addresses, peer_port) as conf:
        print("part 1: each daemon killed and restarted under three request loops", flush=True)
        with loops(
            **{
                "proxyd http": lambda: http_once(http_port),
                "kernel tcp": raw_once,
                "service DNS": lambda: dns_once(gateway, overlay.dns_port, query),
            }
        ) as running:
            time.sleep(1.0)
            warm = {k: loop.between(0, time.monotonic()) for k, loop in running.items()}
            bad = {k: c for k, c in warm.items() if set(c) != {"ok"}}
            if bad:
                raise RuntimeError(f"the loops fail before any restart: {bad}")
            for daemon in DAEMONS:
                for signum in (signal.SIGKILL, signal.SIGTERM):
                    windows.append(signal_window(cluster, running, daemon, signum, args.settle))
                    print(f"  {windows[-1].what}: back in {windows[-1].back:.2f}s", flush=True)
        with loops(**{"proxyd http": lambda: http_once(peer_port)}) as peer:
            time.sleep(1.0)
            for _ in range(2):
                windows.append(nginx_reload_window(conf, peer["proxyd http"], args.settle))
    peer_windows = [w for w in windows if w.what.startswith("nginx")]
    peer_ok = sum(w.counts["proxyd http"]["ok"] for w in peer_windows)
    peer_total = sum(sum(w.counts["proxyd http"].values()) for w in peer_windows)
    peer_rate = peer_ok / peer_total if peer_total else 1.0
    peer_longest = max(w.longest for w in peer_windows)

    print()
    print(
        f"1. requests lost while a daemon is killed or restarted (window: the signal until it "
        f"runs again + {args.settle:.0f}s); lost = refused / timed out "
        f"(http {CLIENT_TIMEOUT:.0f}s, DNS {DNS_TIMEOUT:.0f}s) / other failures, of all requests"
    )
    rows = []
    for window in windows:
        cells = [window.what, f"{window.back:.2f}", f"{window.longest * 1000:.0f}"]
        for loop_name in ("proxyd http", "kernel tcp", "service DNS"):
            counts = window.counts.get(loop_name)
            if counts is None:
                cells.append("-")
                continue
            total = sum(counts.values())
            failed = total - counts["ok"] - counts["refused"] - counts["timeout"]
            cells.append(f"{counts['refused']}/{counts['timeout']}/{failed} of {total}")
        http_counts = window.counts["proxyd http"]
        total = sum(http_counts.values())
        rate = http_counts["ok"] / total if total else 1.0
        cells.append(f"{rate / peer_rate:.2f}x" if peer_rate else "-")
        cells.append(_ratio(window.longest / peer_longest) if peer_longest else "-")
        rows.append(cells)
    print_table(
        [
            "what",
            "back s",
            "longest http ms",
            "http via proxyd",
            "tcp via nft",
            "DNS",
            "http ok vs nginx",
            "longest vs nginx",
        ],
        rows,
    )
    print(
        "http ok vs nginx: the share of requests answered 200 in the window over nginx's share "
        "across its reload (1.00x = lost as few as nginx); back: until running with a new PID "
        "(nginx: until its new worker runs); longest http: the slowest request through the "
        "proxy that ended in the window (a connection waiting for the restarted proxyd)"
    )

    print(f"\npart 2: {args.replicas} replicas adopted by a fresh start", flush=True)
    must(cluster, "down", name, timeout=180)
    empty: list[float] = []
    for _ in range(args.adopt_runs):
        must(cluster, "daemon", "stop")
        empty.append(start_daemons(cluster))
    spec.write_text(
        SPEC.format(
            name=name,
            image=IMAGE,
            httpd=HTTPD,
            http_port=http_port,
            tcp_port=tcp_port,
            replicas=args.replicas,
        )
    )
    must(cluster, "up", "-d", str(spec), "--timeout", "240", timeout=300)
    runs = [adopt_once(cluster, name, http_port, args.replicas) for _ in range(args.adopt_runs)]
    must(cluster, "down", name, timeout=180)
    floor = sorted(empty)[len(empty) // 2]

    def median(key: str) -> float:
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]

    print()
    print(
        f"2. zlayerctl daemon run --detach with {args.replicas} replicas running "
        f"({args.adopt_runs} runs, median)"
    )
    print_table(
        ["what", "s", "vs empty start"],
        [
            ["six daemons ready, nothing deployed (peer)", f"{floor:.2f}", "1.0x"],
            [
                f"six daemons ready, {args.replicas} replicas running",
                f"{median('ready'):.2f}",
                f"{median('ready') / floor:.1f}x",
            ],
            [
                f"all {args.replicas} adopted (same PIDs), running and healthy",
                f"{median('adopted'):.2f}",
                f"{median('adopted') / floor:.1f}x",
            ],
            [
                f"proxyd routes to all {args.replicas}, requests answered",
                f"{median('serving'):.2f}",
                f"{median('serving') / floor:.1f}x",
            ],
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after a daemon is back")
    parser.add_argument("--adopt-runs", type=int, default=2, help="stop/start cycles, part 2")
    parser.add_argument("--replicas", type=int, default=20, help="replicas adopted, part 2")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("restart: running containers needs root", file=sys.stderr)
        return 1
    if shutil.which("nginx") is None:
        print("restart: nginx is not installed; apt-get install nginx-light", file=sys.stderr)
        return 1
    forward_before = IP_FORWARD.read_text().strip()
    work = Path(tempfile.mkdtemp(prefix="zlrst-", dir="/tmp"))
    subnet = free_subnets(1)[0]
    overlay = f'bridge = "zlr{os.getpid() % 100000}"\nsubnet = "{subnet}"\n'
    code = 0
    try:
        with running_daemons({"overlayd": overlay}, zlayer_leftovers) as cluster:
            try:
                measure(cluster, work, args)
            finally:
                for row in ctl_json_or_empty(cluster):
                    cluster.zlayerctl("down", row["name"], timeout=180)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        code = 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"restart: {exc}", file=sys.stderr)
        code = 1
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
        if IP_FORWARD.read_text().strip() != forward_before:
            IP_FORWARD.write_text(forward_before + "\n")
    return code


def ctl_json_or_empty(cluster: Cluster) -> list[dict[str, Any]]:
    with contextlib.suppress(Exception):
        return list(ctl_json(cluster, "ps"))
    return []


if __name__ == "__main__":
    sys.exit(main())
