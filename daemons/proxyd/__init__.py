"""zlayer-proxyd.

Ingress: L7 and L4 routes, load balancing over healthy replicas, request
metrics.
"""
