"""overlayd's nftables table: outbound NAT for the subnet and forwarding for the bridge.

ZLayer keeps its rules in one table of its own (family ``ip``), never in
someone else's, and replaces the whole table in one ``nft -f`` transaction,
so applying is idempotent and a reader never sees half a ruleset. The
``nft`` command is the interface nftables documents and keeps stable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import IPv4Network


class NftError(Exception):
    """nft refused or is missing, in one sentence."""


def ruleset(table: str, bridge: str, subnet: IPv4Network) -> str:
    """The table, as a file for ``nft -f``: declared, emptied, then filled."""
    return f"""\
table ip {table} {{}}
delete table ip {table}
table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade comment "replicas reach out"
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" accept comment "replicas reach out"
        oifname "{bridge}" ct state established,related accept comment "and get answers"
    }}
}}
"""


def apply(table: str, bridge: str, subnet: IPv4Network) -> None:
    _nft(["-f", "-"], ruleset(table, bridge, subnet))


def remove(table: str) -> bool:
    """Delete the table; False if it was not there."""
    if not exists(table):
        return False
    _nft(["delete", "table", "ip", table])
    return True


def exists(table: str) -> bool:
    out = _nft(["-j", "list", "tables", "ip"])
    tables = json.loads(out or "{}").get("nftables", [])
    return any(item.get("table", {}).get("name") == table for item in tables)


def rules(table: str) -> str:
    """The table as nft prints it (for people and tests)."""
    return _nft(["list", "table", "ip", table])


def _nft(args: list[str], stdin: str | None = None) -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise NftError("the nft command is missing; install the nftables package")
    result = subprocess.run(
        [nft, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise NftError(f"nft {' '.join(args)} failed: {message}")
    return result.stdout
