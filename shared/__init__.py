"""The library every ZLayer daemon and zlayerctl share.

It owns the deployment spec models (``shared.spec``), the D-Bus interfaces
and errors (``shared.bus``), file-system paths (``shared.paths``), daemon
configuration (``shared.config``), logging, metrics, sd_notify and the daemon
scaffold (``shared.daemon``). Nothing here is specific to one daemon.
"""

__version__ = "0.1.0"
