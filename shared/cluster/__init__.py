"""What the nodes of a cluster share, over etcd.

- :mod:`shared.cluster.etcd`: an etcd member's command line (:class:`EtcdMember`),
  clients that reach several members with optional mutual TLS, and
  :func:`wait_healthy`.
"""
