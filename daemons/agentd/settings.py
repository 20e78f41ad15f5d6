"""zlayer-agentd's settings: ``/etc/zlayer/agentd.toml`` and ``ZLAYER_AGENTD_*``.

Keys (besides the ones every daemon has):

``cgroup_parent``  the cgroup replicas go under when their spec names no
                   ``cgroup_parent``, default ``zlayer``: a relative name
                   (``zlayer``, ``ops/zlayer``), ``/sys/fs/cgroup/<name>/<replica
                   id>`` with cgroupfs, the slice ``<name with '-' for '/'>.slice``
                   with systemd. Nodes that share a machine (tests) each need
                   their own, since a replica's id is the same on every node.
"""

from __future__ import annotations

from daemons.agentd import cgroups
from shared.config import DaemonSettings, invalid


class AgentSettings(DaemonSettings, kw_only=True):
    # where replicas go whose spec names no cgroup_parent
    cgroup_parent: str = cgroups.PARENT

    def __post_init__(self) -> None:
        problem = cgroups.parent_problem(self.cgroup_parent)
        if problem is not None:
            raise invalid("cgroup_parent", problem)
