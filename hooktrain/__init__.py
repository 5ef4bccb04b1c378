"""hooktrain: an Accelerate-based iteration trainer for semantic segmentation.

``from hooktrain import Segmenter, load_exported`` (:mod:`hooktrain.deploy`) load on first use, so
``import hooktrain`` stays light (no torch).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Segmenter": "deploy.segmenter", "load_exported": "deploy.export"}
__all__ = ["Segmenter", "__version__", "load_exported"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
