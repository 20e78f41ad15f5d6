"""Modules imported on first use, for daemons that need them only for some requests.

``aiohttp = lazy_module("aiohttp")`` binds a module object whose code runs
the first time one of its attributes is read (``importlib.util.LazyLoader``),
so a daemon that never makes that request never pays for the import. Type
checkers see the real module: import it under ``TYPE_CHECKING`` and call
:func:`lazy_module` in the ``else`` branch.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

_lock = threading.Lock()


def lazy_module(name: str) -> types.ModuleType:
    """``name`` as a module that is executed on its first attribute access.

    An already imported module is returned as it is.
    """
    with _lock:
        found = sys.modules.get(name)
        if found is not None:
            return found
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        return module
