"""The image build formats, read the same by zlayerctl and zlayer-registryd.

Owns what a build is written in and asked for, all pure (no buildah, no bus):

- :mod:`.request`: what ``Registry1.Build`` takes and what its job returns;
- :mod:`.located`: the one sentence a bad build file becomes
  (:class:`~.located.BuildFileError`) and the strict model base of the formats;
- :mod:`.zimagefile`: the ZImagefile models and their translation to a Dockerfile;
- :mod:`.runtimes`: the runtime templates and detecting one from a project's files;
- :mod:`.pipeline`: ZPipeline files: variables, defaults, waves, subsets.

Running a build is registryd's (``daemons/registryd/build``).
"""
