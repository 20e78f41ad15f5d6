"""The hosts and resolv.conf files agentd writes for a replica."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.netfiles import NetFileError, hosts_file, resolv_conf
from shared.wire import replace
from shared.wire.overlay import Attachment

ATT = Attachment(
    container_id="web-1",
    netns="/run/netns/zl-0123456789ab",
    interface="eth0",
    address="10.213.0.7",
    prefix_len=16,
    gateway="10.213.0.1",
    dns=["10.255.255.53", "9.9.9.9"],
    search=["corp.example"],
    host_veth="zlv0123456789ab",
    bridge="zlayer0",
)


def test_hosts_has_localhost_itself_and_extras() -> None:
    text = hosts_file(ATT, "web-1.app", ["db:10.213.0.9", "cache=10.213.0.10", "v6:fd00::1"])
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1\tlocalhost"
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in lines
    assert "10.213.0.7\tweb-1.app web-1" in lines
    assert lines[-3:] == ["10.213.0.9\tdb", "10.213.0.10\tcache", "fd00::1\tv6"]
    assert text.endswith("\n")


def test_hosts_on_the_host_network_points_at_127_0_1_1() -> None:
    assert "127.0.1.1\tjob" in hosts_file(None, "job").splitlines()


def test_hosts_without_hostname_has_only_localhost() -> None:
    assert "10.213.0.7" not in hosts_file(ATT, "")


@pytest.mark.parametrize(
    "entry", ["nocolon", "name:", ":10.0.0.1", "bad name:10.0.0.1", "db:not-an-ip", "a\nb:1.2.3.4"]
)
def test_bad_extra_hosts_are_a_sentence(entry: str) -> None:
    with pytest.raises(NetFileError) as caught:
        hosts_file(ATT, "web", [entry])
    assert "\n" not in str(caught.value).replace(repr(entry), "")


def test_bad_hostname_is_refused() -> None:
    with pytest.raises(NetFileError, match="hostname"):
        hosts_file(ATT, "web\n10.0.0.1 evil")


def test_resolv_conf_from_the_attachment() -> None:
    assert resolv_conf(ATT) == (
        "nameserver 10.255.255.53\nnameserver 9.9.9.9\nsearch corp.example\n"
    )


def test_resolv_conf_overrides() -> None:
    text = resolv_conf(ATT, ["1.1.1.1"], ["svc.local", "local"], ["ndots:2"])
    assert text == "nameserver 1.1.1.1\nsearch svc.local local\noptions ndots:2\n"


def test_resolv_conf_keeps_three_nameservers_at_most() -> None:
    text = resolv_conf(ATT, ["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"])
    assert text.count("nameserver") == 3


def test_resolv_conf_without_resolvers_says_so() -> None:
    bare = replace(ATT, dns=[], search=[])
    text = resolv_conf(bare)
    assert all(line.startswith("#") for line in text.splitlines())


@pytest.mark.parametrize(
    ("dns", "search", "options"),
    [(["nope"], [], []), ([], ["bad domain"], []), ([], [], ["two words"])],
)
def test_resolv_conf_refuses_what_would_break_the_file(
    dns: list[str], search: list[str], options: list[str]
) -> None:
    with pytest.raises(NetFileError):
        resolv_conf(ATT, dns, search, options)


@given(st.lists(st.text(), max_size=5))
def test_hosts_never_gets_a_line_it_did_not_mean(extra: list[str]) -> None:
    try:
        text = hosts_file(ATT, "web", extra)
    except NetFileError:
        return
    # Every line is "address<TAB>names": nothing an entry smuggled in.
    assert len(text.splitlines()) == 7 + len(extra)
    assert all("\t" in line for line in text.splitlines())
