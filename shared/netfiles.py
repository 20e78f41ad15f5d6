"""The name-resolution files of a replica: ``/etc/hosts`` and ``/etc/resolv.conf``.

Pure functions of an :class:`~shared.wire.overlay.Attachment` (what overlayd gave
the replica) and the spec's overrides; agentd writes their output into the
replica's bundle. Entries that would break the file format (a newline in a
name, an address that is not one) are refused with a sentence, since a
spec author can put anything in ``extra_hosts`` or ``dns``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import ip_address

from shared.wire.overlay import Attachment

# glibc reads at most three nameserver lines (MAXNS); later ones are ignored.
MAX_NAMESERVERS = 3

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?$")

_LOCAL = (
    "127.0.0.1\tlocalhost",
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "fe00::0\tip6-localnet",
    "ff00::0\tip6-mcastprefix",
    "ff02::1\tip6-allnodes",
    "ff02::2\tip6-allrouters",
)


class NetFileError(ValueError):
    """An entry that cannot go into a hosts or resolv.conf file, in one sentence."""


def hosts_file(
    attachment: Attachment | None, hostname: str, extra_hosts: Sequence[str] = ()
) -> str:
    """``/etc/hosts``: localhost, the replica's own name, then ``extra_hosts``.

    ``extra_hosts`` entries are ``name:address`` (docker's form; the first
    colon splits, so IPv6 addresses work) or ``name=address``. Without an
    attachment (host network) the replica's name points at 127.0.1.1, as
    Debian does for a host's own name.
    """
    lines = list(_LOCAL)
    if hostname:
        _check_name(hostname, "hostname")
        address = attachment.address if attachment else "127.0.1.1"
        names = [hostname]
        short = hostname.split(".", 1)[0]
        if short != hostname:
            names.append(short)
        lines.append(f"{address}\t{' '.join(names)}")
    for entry in extra_hosts:
        name, address = _split_host_entry(entry)
        lines.append(f"{address}\t{name}")
    return "\n".join(lines) + "\n"


def resolv_conf(
    attachment: Attachment,
    dns_override: Sequence[str] = (),
    search: Sequence[str] = (),
    options: Sequence[str] = (),
) -> str:
    """``/etc/resolv.conf``: the spec's ``dns`` if given, else the attachment's resolvers.

    ``search`` replaces the attachment's search list when not empty. With no
    resolver at all the file says so; a resolver then falls back to
    127.0.0.1, which inside a replica answers nothing.
    """
    servers = [_check_address(s) for s in dns_override] or list(attachment.dns)
    domains = list(search) or list(attachment.search)
    for domain in domains:
        _check_name(domain, "search domain")
    lines: list[str] = []
    if not servers:
        lines.append("# no nameserver: set dns in the spec or nameservers in overlayd.toml")
    lines += [f"nameserver {server}" for server in servers[:MAX_NAMESERVERS]]
    if domains:
        lines.append("search " + " ".join(domains))
    for option in options:
        if not option or any(c.isspace() for c in option):
            raise NetFileError(f"the resolver option {option!r} is not a single word")
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def _split_host_entry(entry: str) -> tuple[str, str]:
    name, sep, address = entry.partition(":")
    if not sep or "=" in name:
        name, sep, address = entry.partition("=")
    name, address = name.strip(), address.strip()
    if not sep or not name or not address:
        raise NetFileError(f"the extra host {entry!r} is not in the form name:address")
    _check_name(name, "extra host name")
    return name, _check_address(address)


def _check_name(name: str, what: str) -> None:
    if not _HOSTNAME.match(name) or ".." in name:
        raise NetFileError(f"the {what} {name!r} is not a valid DNS name")


def _check_address(text: str) -> str:
    try:
        return str(ip_address(text.strip()))
    except ValueError:
        raise NetFileError(f"{text!r} is not an IP address") from None
