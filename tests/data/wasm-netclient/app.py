"""A WASI preview 2 command that tries the network: ``tcp HOST:PORT NAME`` connects,
sends a line and prints the answer; ``udp HOST:PORT NAME`` sends a datagram and prints
the reply. A refused socket prints the error and exits 3.

Built with componentize-py for the ``wasi:cli/command`` world; the bindings
(``wit_world``) are generated at build time.
"""

import asyncio
import socket
import sys

from wit_world import exports  # type: ignore[import-not-found]


class Run(exports.Run):  # type: ignore[misc]
    def run(self) -> None:
        kind, address, name = sys.argv[1], sys.argv[2], sys.argv[3]
        host, port = address.rsplit(":", 1)
        try:
            if kind == "tcp":
                asyncio.run(tcp(host, int(port), name))
            else:
                udp(host, int(port), name)
        except OSError as exc:
            print(f"{kind} failed: {exc!r}", flush=True)
            sys.exit(3)


async def tcp(host: str, port: int, name: str) -> None:
    rx, tx = await asyncio.open_connection(host, port)
    tx.write(f"{name} over tcp\n".encode())
    await tx.drain()
    print(f"received {(await rx.readline()).decode().strip()}", flush=True)
    tx.close()


def udp(host: str, port: int, name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(20)
        sock.sendto(f"{name} over udp".encode(), (host, port))
        data, _ = sock.recvfrom(100)
        print(f"received {data.decode()}", flush=True)
