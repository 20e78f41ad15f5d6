"""zlayer-overlayd.

Node networking: the bridge, IPAM, namespaces, service DNS, port publishing,
the mesh between nodes.
"""
