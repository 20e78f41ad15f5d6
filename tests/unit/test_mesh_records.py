"""How schedd turns the nodes' records into mesh peers, and its mesh settings."""

from __future__ import annotations

from pathlib import Path

from ctl.node_cmd import _mesh_cells, unreachable_reason
from daemons.schedd.backend import ClusterSettings
from daemons.schedd.cluster import BEHIND_NAT, mesh_fields, schedd_settings
from daemons.schedd.cluster_placement import peer_block
from shared.paths import Paths
from shared.wire import replace
from shared.wire.cluster import NodeCapacity, NodeList, NodeRecord
from shared.wire.mesh import MeshPeer, MeshStatus

KEY_A = "A" * 43 + "="
KEY_B = "B" * 43 + "="


def record(node: str, address: str, **mesh: object) -> NodeRecord:
    return NodeRecord(
        id=node,
        name=node,
        address=address,
        peer_port=9480,
        capacity=NodeCapacity(cpu=1, memory=2**30),
        subnet=f"10.90.{node[-1]}.0/24",
        **mesh,  # type: ignore[arg-type]
    )


def status(key: str, port: int = 51820, enabled: bool = True) -> MeshStatus:
    return MeshStatus(
        enabled=enabled,
        interface="zlm0",
        implementation="wireguard-go" if enabled else "",
        public_key=key,
        listen_port=port,
        mtu=1420,
        address="10.90.1.1",
        reason="" if enabled else "wireguard-go is not installed; install it",
    )


def test_a_peer_with_a_key_is_reached_through_the_mesh_at_its_address_and_port() -> None:
    own = record("n1", "172.31.1.11", wireguard_key=KEY_A, mesh_port=51820, mesh_keepalive=25)
    other = record("n2", "172.31.2.11", wireguard_key=KEY_B, mesh_port=51821, mesh_keepalive=5)
    block = peer_block(own, other)
    assert block.wireguard_key == KEY_B
    assert block.endpoint == "172.31.2.11:51821"
    assert block.keepalive == 25  # the longer of the two
    assert (block.node, block.subnet, block.address) == ("n2", "10.90.2.0/24", "172.31.2.11")


def test_a_peer_behind_nat_has_no_endpoint_so_its_handshake_sets_it() -> None:
    own = record("n1", "172.31.1.11", wireguard_key=KEY_A, mesh_port=51820)
    other = record(
        "n3",
        "192.168.7.2",
        wireguard_key=KEY_B,
        mesh_port=51820,
        mesh_keepalive=5,
        reachable=False,
        reachability=BEHIND_NAT,
    )
    block = peer_block(own, other)
    assert block.wireguard_key == KEY_B and block.endpoint == "" and block.keepalive == 5


def test_without_a_key_on_either_side_the_plain_route_stays() -> None:
    keyed = record("n1", "172.31.1.11", wireguard_key=KEY_A, mesh_port=51820)
    plain = record("n2", "172.31.2.11")
    for own, other in ((keyed, plain), (plain, keyed)):
        block = peer_block(own, other)
        assert (block.wireguard_key, block.endpoint, block.keepalive) == ("", "", 0)


def test_the_record_says_what_overlayd_reports_and_nothing_when_the_mesh_is_off() -> None:
    on = ClusterSettings(mesh_port=51999, mesh_keepalive=7)
    assert mesh_fields(on, status(KEY_A, 51999)) == {
        "wireguard_key": KEY_A,
        "mesh_port": 51999,
        "mesh_keepalive": 7,
        "reachable": True,
        "reachability": "",
    }
    assert mesh_fields(on, None)["wireguard_key"] == ""  # overlayd not answering yet
    assert mesh_fields(on, status(KEY_A, enabled=False))["mesh_port"] == 0
    off = ClusterSettings(mesh=False, behind_nat=True)
    fields = mesh_fields(off, status(KEY_A))
    assert fields["wireguard_key"] == "" and fields["mesh_keepalive"] == 0
    assert fields["reachable"] is False and "behind NAT" in fields["reachability"]


def test_schedd_reads_the_mesh_settings_from_its_cluster_section(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.config_dir.mkdir(parents=True)
    assert schedd_settings(paths) == ClusterSettings()  # no file: the defaults
    assert (ClusterSettings().mesh, ClusterSettings().mesh_port) == (True, 51820)
    paths.daemon_config("schedd").write_text(
        "[cluster]\nmesh = false\nmesh_port = 51900\nmesh_keepalive = 3\nbehind_nat = true\n"
    )
    found = schedd_settings(paths)
    assert (found.mesh, found.mesh_port, found.mesh_keepalive, found.behind_nat) == (
        False,
        51900,
        3,
        True,
    )
    paths.daemon_config("schedd").write_text("[cluster]\nmesh_port = 0\n")
    assert schedd_settings(paths) == ClusterSettings()  # refused: schedd says why at start


def peer(key: str, endpoint: str, handshake: float) -> MeshPeer:
    return MeshPeer(
        public_key=key,
        endpoint=endpoint,
        allowed_ips=["10.90.2.0/24"],
        last_handshake=handshake,
        rx_bytes=2048,
        tx_bytes=4096,
        keepalive=25,
    )


def test_node_ls_says_why_a_node_is_not_reachable_directly() -> None:
    mesh = replace(status(KEY_A), peers=[peer(KEY_B, "172.31.9.1:40001", 1000.0)])
    nat = record("n3", "192.168.7.2", wireguard_key=KEY_B, mesh_port=51820)
    # its handshakes come from another address than the one it advertises: NAT
    assert "behind NAT" in unreachable_reason(nat, "n1", mesh, 60)
    said = replace(nat, reachable=False, reachability=BEHIND_NAT)
    assert unreachable_reason(said, "n1", mesh, 60) == BEHIND_NAT
    assert unreachable_reason(said, "n3", None, 60) == BEHIND_NAT  # on itself too
    direct = replace(status(KEY_A), peers=[peer(KEY_B, "192.168.7.2:51820", 1000.0)])
    assert unreachable_reason(nat, "n1", direct, 60) == ""
    silent = replace(status(KEY_A), peers=[peer(KEY_B, "192.168.7.2:51820", 0.0)])
    assert "no mesh handshake" in unreachable_reason(nat, "n1", silent, 60)
    assert unreachable_reason(nat, "n1", silent, 5) == ""  # just started: not yet


def test_node_ls_shows_each_peers_handshake_and_transfer() -> None:
    mesh = replace(status(KEY_A), peers=[peer(KEY_B, "172.31.2.11:51820", 1000.0)])
    own = record("n1", "172.31.1.11", wireguard_key=KEY_A, mesh_port=51820)
    other = record("n2", "172.31.2.11", wireguard_key=KEY_B, mesh_port=51820)
    listed = NodeList(nodes=[own, other], leader="n1", this_node="n1")
    assert _mesh_cells(other, listed, mesh, 1012.0) == ["12s ago", "2.0 KiB in, 4.0 KiB out"]
    assert _mesh_cells(own, listed, mesh, 1012.0)[0] == "(this node)"
    assert _mesh_cells(record("n4", "172.31.4.11"), listed, mesh, 1012.0)[0] == "plain"
