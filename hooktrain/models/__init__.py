"""Segmentors: timm encoders with decode heads, losses and inference.

The names below are imported on first use, so reading the recipe schema
(``hooktrain.recipe.model``) never imports torch or timm.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "hooktrain.recipe.model",
    "Segmentor": "hooktrain.models.segmentor",
    "build_segmentor": "hooktrain.models.segmentor",
    "build_recipe_segmentor": "hooktrain.models.segmentor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
