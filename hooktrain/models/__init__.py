"""Segmentors: timm encoders with decode heads, losses and inference.

The names below are imported on first use, so reading the recipe schema
(``hooktrain.models.config``) never imports torch or timm.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "config",
    "Segmentor": "segmentor",
    "build_segmentor": "segmentor",
    "build_recipe_segmentor": "segmentor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
