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
``max_concurrent_downloads``  layers fetched at once per pull, default 6 (as skopeo)
``max_concurrent_uploads``    layers pushed at once per push, default 3
``chunk_size``            bytes per PATCH of a chunked upload; blobs larger than
                          this are uploaded in chunks, smaller ones in one PUT
                          (default 16 MiB)
``request_timeout``       seconds without a byte from a registry before a
                          transfer is given up, default 60
``max_layer_size``        bytes one layer blob may have as downloaded
                          (compressed), default 10 GiB (10737418240): a larger
                          declared size is refused before the download, and a
                          blob with no declared size is cut off there
``max_layer_unpacked_size``  bytes one layer may unpack to (its tar, and the
                          files written from it), default 50 GiB (53687091200)

Before a layer downloads, the free space where the store lives must hold
what the registry declares it to be (less what an earlier attempt left).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from daemons.registryd.unpack import DEFAULT_MAX_UNPACKED
from shared.config import DaemonSettings, invalid

DEFAULT_CHUNK = 16 << 20
DEFAULT_MAX_LAYER = 10 << 30


class RegistrySettings(DaemonSettings, kw_only=True):
    # registry -> mirror URLs, tried in order
    mirrors: dict[str, list[str]] = msgspec.field(default_factory=dict)
    # registries reached over plain HTTP
    insecure_registries: list[str] = msgspec.field(default_factory=list)
    # layers fetched at once
    max_concurrent_downloads: Annotated[int, Meta(ge=1, le=32)] = 6
    # layers pushed at once
    max_concurrent_uploads: Annotated[int, Meta(ge=1, le=32)] = 3
    # bytes per upload chunk
    chunk_size: Annotated[int, Meta(ge=1 << 16)] = DEFAULT_CHUNK
    # seconds a stalled transfer waits
    request_timeout: Annotated[float, Meta(gt=0)] = 60.0
    # bytes of one layer blob as downloaded
    max_layer_size: Annotated[int, Meta(ge=1)] = DEFAULT_MAX_LAYER
    # bytes one layer may unpack to
    max_layer_unpacked_size: Annotated[int, Meta(ge=1)] = DEFAULT_MAX_UNPACKED

    def __post_init__(self) -> None:
        for registry, urls in self.mirrors.items():
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise invalid(
                        "mirrors",
                        f"the mirror {url!r} of {registry} must start with http:// or https://",
                    )
        self.mirrors = {
            registry: [u.rstrip("/") for u in urls] for registry, urls in self.mirrors.items()
        }
