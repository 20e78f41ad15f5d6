"""What the nodes of a cluster share, over etcd.

- :mod:`shared.cluster.etcd`: an etcd member's command line (:class:`EtcdMember`),
  clients that reach several members with optional mutual TLS, and
  :func:`wait_healthy`.
- :mod:`shared.cluster.pki`: the cluster CA, each node's key and certificate (ECDSA
  P-256, for etcd and gRPC, server and client) and their 0600 files.
- :mod:`shared.cluster.jointoken`: join tokens (address, port, secret, CA fingerprint,
  expiry in one line) and the record of a token the cluster keeps (its secret's hash).
- :mod:`shared.cluster.peer`: gRPC between nodes (``zlayer.Node1``: Join, Ping, Logs,
  Exec, Stats) with mutual TLS from the cluster CA, msgspec JSON messages, no protoc.
- :mod:`shared.cluster.config`: a node's ``cluster.toml`` (its id, address, etcd
  endpoints, the etcd member it runs); absent on a lone node.
- :mod:`shared.cluster.secretkey`: the key every node seals and opens secrets with,
  made at init and handed to each joining node in Join's reply.
- :mod:`shared.cluster.locate`: which node runs each replica a command means (bus and
  wire only: a lone node never loads gRPC for it).
- :mod:`shared.cluster.remote`: Node1's Logs, Exec and Stats of a replica on another
  node (both sides).
- :mod:`shared.cluster.blocks`: the cluster's settings (replica range, block size, etcd
  voters) and each node's block of the range, taken and freed in etcd transactions.
- :mod:`shared.cluster.trust`: the CA key sealed in etcd (any node signs joins), the
  certificates issued, revoked nodes refused at the peer port, the CA's CRL for etcd.
- :mod:`shared.cluster.filestamp`: whether a node's TLS files changed (a renewal in
  place), and whether the change has settled, for the readers that keep them.
"""
