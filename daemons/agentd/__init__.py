"""zlayer-agentd.

Everything that runs on this node: OCI bundles, crun and conmon, cgroups,
logs, exec, stats, health checks, init steps, jobs.
"""
