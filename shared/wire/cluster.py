"""A cluster's records, as they live in etcd and cross between nodes.

- :class:`NodeRecord`: what a node publishes about itself under its lease
  (``/zlayer/nodes/<id>``); a lapsed lease removes it, and the node is gone.
- :class:`Placement` and :class:`NodePlacements`: what the leading schedd
  decides, one document per node (``/zlayer/assignments/<id>``), stamped with
  a generation so a node that comes back stops what it no longer owns.

The key layout under the cluster's prefix (``/zlayer/``) is in
:data:`KEYS`; every module that reads or writes etcd takes its keys from there.
"""

from __future__ import annotations

from typing import Literal

from shared.wire import Wire

PREFIX = "/zlayer/"

# Where each kind of record lives, under PREFIX. One place, so the store, the
# membership, the placement writer and the tests agree.
KEYS = {
    "state": PREFIX + "state/",  # schedd's desired state (the etcd store backend)
    "nodes": PREFIX + "nodes/",  # nodes/<id>: NodeRecord, bound to the node's lease
    "leader": PREFIX + "leader",  # the placing schedd's election key, bound to its lease
    "assignments": PREFIX + "assignments/",  # assignments/<id>: NodePlacements
    "subnets": PREFIX + "subnets/",  # subnets/<cidr>: the node id holding that block
    "join_tokens": PREFIX + "join-tokens/",  # join-tokens/<sha256 of secret>: JoinTokenRecord
    "node_settings": PREFIX + "node-settings/",  # node-settings/<id>: NodeSettings, no lease
    # replicas/<node>/<replica id>: the ReplicaInfo of a replica that node runs, bound to
    # its lease, so every node routes to every node's healthy replicas
    "replicas": PREFIX + "replicas/",
    "cluster": PREFIX + "cluster",  # ClusterSettings: the subnet, its block size, the voters
    # SealedCaKey: the CA's key sealed with the cluster's secrets key, so any node signs
    "ca_key": PREFIX + "ca-key",
    # certificates/<node>/<serial hex>: IssuedCertificate, each node certificate signed
    "certificates": PREFIX + "certificates/",
    "revoked": PREFIX + "revoked/",  # revoked/<node>: RevokedNode, a removed node's
    # routed/<node>: NodeRoutes, the backends that node's proxyd routes, bound to its lease
    "routed": PREFIX + "routed/",
}

NodeState = Literal["ready", "draining", "down"]


class NodeCapacity(Wire, frozen=True, kw_only=True):
    """What a node offers replicas: CPUs (fractions allowed) and memory in bytes."""

    cpu: float
    memory: int


class NodeRecord(Wire, frozen=True, kw_only=True):
    """One node as the cluster knows it."""

    id: str  # stable, made at init/join (not the hostname: hostnames repeat)
    name: str  # the hostname, for people
    address: str  # the address other nodes reach it at (advertise address)
    peer_port: int  # its gRPC port for calls between nodes
    labels: dict[str, str] = {}
    capacity: NodeCapacity
    subnet: str = ""  # its block of the cluster subnet, "10.89.3.0/24"
    state: NodeState = "ready"
    wireguard_key: str = ""  # its WireGuard public key (base64), once the mesh is on
    mesh_port: int = 0  # the UDP port its WireGuard listens on (0: the mesh is off)
    # seconds between keepalives on its mesh links; its peers use it toward it too, so a
    # NAT mapping on either side stays open (0: none)
    mesh_keepalive: int = 0
    # False: the others cannot reach it first (behind NAT); they wait for its handshake
    reachable: bool = True
    reachability: str = ""  # why it is not reachable, one sentence ("" when it is)
    etcd_member: bool = False  # a voting etcd member, not only a client
    started_at: float = 0.0


class Placement(Wire, frozen=True, kw_only=True):
    """One replica placed on a node."""

    deployment: str
    service: str
    replica: str  # the replica's name, unique in the cluster ("app-web-3")
    revision: int
    cpu: float = 0.0  # what it reserves, from the service's resources
    memory: int = 0


class NodePlacements(Wire, frozen=True, kw_only=True):
    """Everything one node should run, as of a generation of the placement."""

    node: str
    generation: int
    replicas: list[Placement] = []


class JoinTokenRecord(Wire, frozen=True, kw_only=True):
    """A join token as the cluster keeps it: the SHA-256 of its secret, never the secret."""

    secret_sha256: str  # lowercase hex; also the last part of its key
    expires_at: float  # Unix time
    created_at: float
    created_by: str = ""  # the node id that made it


class JoinRequest(Wire, frozen=True, kw_only=True):
    """What a joining node sends the node in its token (gRPC ``zlayer.Node1/Join``)."""

    secret: str  # the token's secret, as in the token
    csr: str  # PEM certificate signing request: its node id (CN) and addresses
    name: str = ""  # its hostname, for people


class JoinReply(Wire, frozen=True, kw_only=True):
    """The joined node's certificate, the cluster CA, where etcd answers and the key
    secrets are sealed with (sent only over TLS the joining node pinned by the token)."""

    certificate: str  # PEM, signed by the CA
    ca_certificate: str  # PEM
    etcd_endpoints: list[str]  # client URLs (https://HOST:PORT)
    # the cluster's secrets key (shared.cluster.secretkey), base64; "" from a node without one
    secrets_key: str = ""
    # the address the join came from, as the answering node saw it ("" from an older
    # node): another than the joining node's own means a NAT in between
    source_address: str = ""


class PingRequest(Wire, frozen=True, kw_only=True):
    """``zlayer.Node1/Ping``: is the node there, and who does it take the caller for."""


class PingReply(Wire, frozen=True, kw_only=True):
    node: str  # the answering node's id
    peer: str  # the caller's node id, from its client certificate
    time: float  # the answering node's clock (Unix time)


class NodeSettings(Wire, frozen=True, kw_only=True):
    """What people set on a node from any node (``node label``, ``node drain``, ``node
    rm``), kept without a lease; the node applies it to its own record."""

    labels: dict[str, str] = {}
    state: NodeState = "ready"
    removed: bool = False  # taken out of the cluster: the node leaves
    # a client asked to become an etcd voter (a voter was removed): it adds its member
    voter: bool = False
    # why the others cannot reach it first, seen at its join (its join came from another
    # address than its own: NAT); "" when nothing was seen
    reachability: str = ""


class NodeList(Wire, frozen=True, kw_only=True):
    """``Scheduler1.ListNodes``: the live nodes as the answering node sees them."""

    nodes: list[NodeRecord]
    leader: str = ""  # the id of the node that places replicas, "" while none does
    this_node: str = ""  # the answering node's id


class ClusterSettings(Wire, frozen=True, kw_only=True):
    """What holds for the whole cluster, written once at ``node init``
    (``KEYS["cluster"]``): the replicas' range, cut into one block per node
    (``KEYS["subnets"]``), and how many nodes are etcd voters at most."""

    subnet: str  # the cluster's replica range, "10.213.0.0/16"
    block_prefix: int = 24  # each node's block: a /24 of it
    voters: int = 3  # etcd voters at most (odd, up to 7); later nodes are clients


class SealedCaKey(Wire, frozen=True, kw_only=True):
    """The cluster CA's private key (PKCS#8 DER) sealed with AES-256-GCM under the
    cluster's secrets key, the CA's fingerprint as associated data (``KEYS["ca_key"]``)."""

    ca_sha256: str  # the CA it belongs to (lowercase hex)
    nonce: str  # base64, 12 bytes
    sealed: str  # base64: ciphertext and tag


class IssuedCertificate(Wire, frozen=True, kw_only=True):
    """A node certificate the CA signed (``KEYS["certificates"]<node>/<serial hex>``)."""

    node: str
    serial: str  # lowercase hex
    not_after: float  # Unix time
    issued_at: float = 0.0


class RevokedNode(Wire, frozen=True, kw_only=True):
    """A node taken out by ``node rm`` (``KEYS["revoked"]<node>``): its certificates are
    refused by every node's peer port and by etcd's members (their CRL)."""

    node: str
    serials: list[str] = []  # its certificates' serials, lowercase hex
    revoked_at: float
    not_after: float = 0.0  # when the last of them expires (then the entry may go)


class RenewRequest(Wire, frozen=True, kw_only=True):
    """``zlayer.Node1/Renew``: a node's request for a new certificate of its own id (its
    current one has less than a third of its life left), over mutual TLS."""

    csr: str  # PEM; its common name must be the caller's node id


class RenewReply(Wire, frozen=True, kw_only=True):
    certificate: str  # PEM, signed by the CA


class NodeRoutes(Wire, frozen=True, kw_only=True):
    """The backend addresses a node's proxyd routes now, by ``deployment/service``
    (``KEYS["routed"]<node>``): a draining node's replica stops only once every node
    routes its new copy."""

    node: str
    routes: dict[str, list[str]] = {}
