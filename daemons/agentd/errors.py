"""The runtime library's errors: each message is one plain sentence for a person.

They are plain exceptions, not bus errors: the bus service maps them to named
D-Bus errors, so the library stays usable without a bus.
"""

from __future__ import annotations


class ContainerError(Exception):
    """A container operation failed; ``str(error)`` says what happened and what to do."""


class ContainerNotFound(ContainerError):
    """No container of that id exists on this node."""


class BundleError(ContainerError):
    """The spec cannot become a container on this node."""


class CgroupError(ContainerError):
    """The host's cgroups cannot run containers."""


class SpecRefused(BundleError):
    """The spec, with its image, can never become a container on this node.

    Trying again cannot help until the spec changes, so a replica refused so
    stays failed instead of backing off and retrying for ever.
    """
