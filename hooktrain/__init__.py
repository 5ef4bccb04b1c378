"""hooktrain: an Accelerate-based iteration trainer for semantic segmentation.

``from hooktrain import Segmenter`` (:mod:`hooktrain.api`) loads on first use, so
``import hooktrain`` stays light (no torch).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Segmenter": "api"}
__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
