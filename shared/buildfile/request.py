"""What ``Registry1.Build`` takes and what its job returns, as JSON on the bus.

Paths are absolute and read by zlayer-registryd itself, so they must be
visible to the daemon (under systemd it has a private ``/tmp`` and no
``/home``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RUNTIME_AUTO = "auto"


class BuildRequest(BaseModel):
    """One image build. At most one of ``dockerfile``, ``zimagefile``, ``runtime``;
    with none, the context's ZImagefile, else its Dockerfile, is built."""

    model_config = ConfigDict(extra="forbid")

    context: str
    dockerfile: str = ""
    zimagefile: str = ""
    runtime: str = ""  # a template name, or "auto" to pick one from the context's files
    tags: list[str] = Field(default_factory=list)
    build_args: dict[str, str] = Field(default_factory=dict)
    target: str = ""
    no_cache: bool = False
    format: Literal["oci", "docker"] = "oci"


class BuildResult(BaseModel):
    """The JSON result of a finished build job."""

    model_config = ConfigDict(extra="forbid")

    id: str  # the image id in the store (sha256 of its config)
    names: list[str]  # every name the stored image now has
    source: str  # what was built: "Dockerfile", "ZImagefile", "runtime template node22"
    seconds: float
