"""Image builds in zlayer-registryd: a build request, run by buildah.

- :mod:`.builder`: a build request, run by buildah under registryd's own storage
  root, its result imported into the image store.

The formats it reads (ZImagefile, ZPipeline, runtime templates, the request)
are in :mod:`shared.buildfile`, which zlayerctl reads too.
"""
