"""Data: sources (hub / parquet / folder / shapes), transforms, the train stream and the
val loader. See docs/architecture.md for the contract with the runner and the eval hook.

The names below are imported on first use, so reading the recipe schema
(``hooktrain.recipe.data``) never imports torch or datasets.
"""

import importlib

_EXPORTS = {
    "DataConfig": "hooktrain.recipe.data",
    "TrainDataConfig": "hooktrain.recipe.data",
    "ValDataConfig": "hooktrain.recipe.data",
    "HubSource": "hooktrain.recipe.data",
    "ParquetSource": "hooktrain.recipe.data",
    "FolderSource": "hooktrain.recipe.data",
    "ShapesSource": "hooktrain.recipe.data",
    "SHAPES_CLASSES": "hooktrain.data.shapes",
    "SHAPES_PALETTE": "hooktrain.data.shapes",
    "generate_shapes": "hooktrain.data.shapes",
    "load_source": "hooktrain.data.sources",
    "prepare_data": "hooktrain.data.sources",
    "build_train_stream": "hooktrain.data.stream",
    "TrainStream": "hooktrain.data.stream",
    "build_val_loader": "hooktrain.data.val",
    "ValLoader": "hooktrain.data.val",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
