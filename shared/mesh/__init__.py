"""WireGuard for the node mesh: keys, the device a node configures, and how it runs.

- :mod:`shared.mesh.keys`: X25519 key pairs, base64 as ``wg genkey`` and
  ``wg pubkey`` write them, and the hex the userspace protocol uses.
- :mod:`shared.mesh.device`: what a configured device is and holds
  (:class:`~shared.mesh.device.PeerConfig`, :class:`~shared.mesh.device.DeviceState`),
  the plan that moves a device's peers to the wanted ones without touching
  unchanged peers, and :class:`~shared.mesh.device.MeshError`.
- :mod:`shared.mesh.uapi`: the cross-platform userspace API (``set=1`` /
  ``get=1`` text on ``/var/run/wireguard/<iface>.sock``): its parser, its
  writer and a blocking client.
- :mod:`shared.mesh.userspace`: ``wireguard-go`` as a child process: started
  in the foreground, its PID kept, found again after a restart, stopped by PID,
  a stale socket handled.
- :mod:`shared.mesh.kernel`: the kernel's WireGuard through pyroute2's generic
  netlink, where the kernel has the module.
"""
