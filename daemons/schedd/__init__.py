"""zlayer-schedd.

Desired state: deployments and revisions, the reconcile loop, placement,
autoscaling, rollouts.
"""
