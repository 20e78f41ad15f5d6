"""Image builds: ZImagefile and ZPipeline formats, runtime templates, and buildah.

- :mod:`.located`: YAML read with every node's line and column, and the one
  sentence a bad build file becomes (:class:`BuildFileError`);
- :mod:`.zimagefile`: the ZImagefile models and their translation to a Dockerfile;
- :mod:`.runtimes`: the runtime templates and detecting one from a project's files;
- :mod:`.pipeline`: ZPipeline files: variables, defaults, waves, subsets;
- :mod:`.builder`: a build request, run by buildah under registryd's own storage
  root, its result imported into the image store.

Everything but :mod:`.builder` is pure and imported by zlayerctl too.
"""
