"""Benches, the simulator, the simulated audience, peer policies and load generators. The runtime never imports
this package; it needs the bench extra (vowpalwabbit, matplotlib).
"""

if __name__ != "privads.bench":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.bench, not {__name__}: the checkout's folders are the privads package")

import importlib
from types import ModuleType


def optional(module: str) -> ModuleType:
    """Import a dependency of the ``bench`` extra, or say how to install it (one line)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        from privads.infra.errors import NotFound

        raise NotFound(f"{module} is not installed: it comes with the bench extra, pip install 'privads[bench]'") \
            from None
