"""HTTP/1.1 proxying: zlayer-proxyd against nginx, same backends, same wrk load, same run.

Two backends serve a small static file: one nginx (``worker_processes 1``)
listening on 127.0.0.2 and 127.0.0.3. In front of them, taking turns under
the same ``wrk`` load (threads, connections, duration):

- nginx as a reverse proxy (``worker_processes 1``, an ``upstream`` with
  both backends, round-robin, ``keepalive 64``, HTTP/1.1 upstream, access
  log off): the peer;
- zlayer-proxyd (one process, one core, as it runs; access log off), on a
  private bus of its own, given the same two backends with ``SetTraffic``;
- wrk straight at one backend, for the ceiling of this machine.

Everything lives in a temporary directory and is stopped by PID at the end,
also on Ctrl-C. Needs ``wrk`` and ``nginx`` (apt-get install wrk nginx).

    .venv/bin/python bench/proxy_http.py [--duration 8] [--connections 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import print_table

from ctl.supervisor import find_executable
from shared.bus import open_bus
from shared.busdaemon import PrivateBus
from shared.clients import ProxyClient
from shared.paths import PREFIX_ENV, Paths
from shared.wire.daemon import DaemonStatus

BACKENDS = ["127.0.0.2", "127.0.0.3"]
PAGE = b"<html><body>" + b"zlayer " * 80 + b"</body></html>\n"  # about 600 bytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def nginx_conf(root: Path, body: str) -> str:
    return f"""
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
{body}
}}
"""


@contextlib.contextmanager
def nginx(root: Path, body: str, ports: list[tuple[str, int]]) -> Iterator[subprocess.Popen[bytes]]:
    root.mkdir(parents=True)
    conf = root / "nginx.conf"
    conf.write_text(nginx_conf(root, body))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for host, port in ports:
            wait_port(host, port)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def proxyd(root: Path) -> Iterator[PrivateBus]:
    """zlayer-proxyd alone (the only daemon this measures) on a private bus."""
    paths = Paths(root / "prefix")
    paths.config_dir.mkdir(parents=True)
    paths.daemon_config("proxyd").write_text(
        'metrics_port = 0\nlisten_addresses = ["127.0.0.1"]\naccess_log = false\n'
    )
    bus = PrivateBus(root / "bus.sock")
    bus.start()
    env = dict(os.environ, **{PREFIX_ENV: str(paths.prefix), "ZLAYER_BUS_ADDRESS": bus.address})
    process = subprocess.Popen(
        [find_executable("zlayer-proxyd")], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 15
        status = DaemonStatus.from_dbus(call(bus, "status", wait=15.0))  # type: ignore[arg-type]
        while status.state != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = DaemonStatus.from_dbus(call(bus, "status"))  # type: ignore[arg-type]
        yield bus
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        bus.stop()


def call(bus: PrivateBus, method: str, *args: object, wait: float = 0.0) -> object:
    async def once() -> object:
        connection = open_bus(bus.address)
        try:
            return await getattr(ProxyClient(connection)._proxy, method)(*args)
        finally:
            connection.close()

    deadline = time.monotonic() + wait
    while True:
        try:
            return asyncio.run(once())
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wrk(url: str, threads: int, connections: int, duration: int) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of one wrk run."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, _latency(out, "50%"), _latency(out, "99%")


def _latency(out: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    value = float(match.group(1))
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="turns each proxy takes")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed; apt-get install {tool}", file=sys.stderr)
            return 1

    root = Path(tempfile.mkdtemp(prefix="zlbench-proxy-", dir="/tmp"))
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        root.chmod(0o755)  # nginx's workers run as an unprivileged user
        site = root / "site"
        site.mkdir()
        (site / "index.html").write_bytes(PAGE)
        backend_port = free_port()
        listens = "\n".join(f"        listen {a}:{backend_port};" for a in BACKENDS)
        backend_body = f"""
    server {{
{listens}
        root {site};
        keepalive_timeout 120s;
    }}"""
        nginx_port = free_port()
        upstreams = "\n".join(f"        server {a}:{backend_port};" for a in BACKENDS)
        proxy_body = f"""
    upstream backends {{
{upstreams}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}"""
        backend_ports = [(a, backend_port) for a in BACKENDS]
        with (
            nginx(root / "backend", backend_body, backend_ports),
            nginx(root / "peer", proxy_body, [("127.0.0.1", nginx_port)]),
            proxyd(root / "proxyd") as bus,
        ):
            proxyd_port = free_port()  # proxyd listens on the endpoint's port
            traffic = {
                "deployment": "bench",
                "services": [
                    {
                        "deployment": "bench",
                        "service": "web",
                        "endpoints": [
                            {
                                "name": "http",
                                "protocol": "http",
                                "port": proxyd_port,
                                "target_port": backend_port,
                                "expose": "public",
                            }
                        ],
                        "backends": [
                            {
                                "replica": f"bench-web-{i}-r1",
                                "instance": i,
                                "revision": 1,
                                "address": a,
                            }
                            for i, a in enumerate(BACKENDS, start=1)
                        ],
                    }
                ],
            }
            call(bus, "set_traffic", "bench", json.dumps(traffic))
            targets = {
                "nginx 1 worker (peer)": f"http://127.0.0.1:{nginx_port}/index.html",
                "zlayer-proxyd": f"http://127.0.0.1:{proxyd_port}/index.html",
                "backend direct (ceiling)": f"http://{BACKENDS[0]}:{backend_port}/index.html",
            }
            for url in targets.values():  # warm up: connections, pools, caches
                wrk(url, args.threads, args.connections, 2)
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    results[name].append(wrk(url, args.threads, args.connections, args.duration))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    summary = {
        name: (mean([r[0] for r in runs]), mean([r[1] for r in runs]), mean([r[2] for r in runs]))
        for name, runs in results.items()
    }
    peer_rps, _, peer_p99 = summary["nginx 1 worker (peer)"]
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, "
        f"{args.rounds} rounds taking turns (means); 2 nginx backends serving "
        f"{len(PAGE)} bytes; {os.cpu_count()} cores"
    )
    rows = [
        [
            name,
            f"{rps:,.0f}",
            f"{p50:.2f}",
            f"{p99:.2f}",
            f"{rps / peer_rps:.2f}x",
            f"{p99 / peer_p99:.2f}x",
        ]
        for name, (rps, p50, p99) in summary.items()
    ]
    print_table(["what", "req/s", "p50 ms", "p99 ms", "req/s vs nginx", "p99 vs nginx"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
