"""zlayer-registryd's settings: ``/etc/zlayer/registryd.toml`` and ``ZLAYER_REGISTRYD_*``.

Keys (besides the ones every daemon has):

``mirrors``               per registry, mirror URLs tried in order before the
                          registry itself: ``mirrors = {"docker.io" =
                          ["https://mirror.example.com"]}``. A mirror that
                          fails or lacks the image falls through to the next,
                          then to the registry
``insecure_registries``   registries spoken to over plain HTTP (``"host:port"``);
                          ``localhost`` and ``127.0.0.1`` are always tried with
                          HTTPS first, then plain HTTP, as Docker does
``max_concurrent_downloads``  layers fetched at once per pull, default 3
``max_concurrent_uploads``    layers pushed at once per push, default 3
``chunk_size``            bytes per PATCH of a chunked upload; blobs larger than
                          this are uploaded in chunks, smaller ones in one PUT
                          (default 16 MiB)
``request_timeout``       seconds without a byte from a registry before a
                          transfer is given up, default 60
"""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.config import DaemonSettings

DEFAULT_CHUNK = 16 << 20


class RegistrySettings(DaemonSettings):
    mirrors: dict[str, list[str]] = Field(
        default_factory=dict, description="registry -> mirror URLs, tried in order"
    )
    insecure_registries: list[str] = Field(
        default_factory=list, description="registries reached over plain HTTP"
    )
    max_concurrent_downloads: int = Field(3, ge=1, le=32, description="layers fetched at once")
    max_concurrent_uploads: int = Field(3, ge=1, le=32, description="layers pushed at once")
    chunk_size: int = Field(DEFAULT_CHUNK, ge=1 << 16, description="bytes per upload chunk")
    request_timeout: float = Field(60.0, gt=0, description="seconds a stalled transfer waits")

    @field_validator("mirrors")
    @classmethod
    def _mirror_urls(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for registry, urls in value.items():
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(
                        f"the mirror {url!r} of {registry} must start with http:// or https://"
                    )
        return {registry: [u.rstrip("/") for u in urls] for registry, urls in value.items()}
