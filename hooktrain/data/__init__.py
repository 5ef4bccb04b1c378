"""Data: sources (hub / parquet / folder / shapes), transforms, the train stream and the
val loader. See docs/architecture.md for the contract with the runner and the eval hook.

The names below are imported on first use, so reading the recipe schema
(``hooktrain.data.config``) never imports torch or datasets.
"""

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "TrainDataConfig": "config",
    "ValDataConfig": "config",
    "HubSource": "config",
    "ParquetSource": "config",
    "FolderSource": "config",
    "ShapesSource": "config",
    "SHAPES_CLASSES": "shapes",
    "SHAPES_PALETTE": "shapes",
    "generate_shapes": "shapes",
    "load_source": "sources",
    "prepare_data": "sources",
    "build_train_stream": "stream",
    "TrainStream": "stream",
    "build_val_loader": "val",
    "ValLoader": "val",
    "convert_folder": "convert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
