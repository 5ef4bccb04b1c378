"""Data: sources (hub / parquet / folder / shapes), transforms, the train stream and the
val loader. See docs/architecture.md for the contract with the runner and the eval hook."""

from hooktrain.data.config import (
    DataConfig,
    FolderSource,
    HubSource,
    ParquetSource,
    ShapesSource,
    TrainDataConfig,
    ValDataConfig,
)
from hooktrain.data.convert import convert_folder
from hooktrain.data.shapes import SHAPES_CLASSES, SHAPES_PALETTE, generate_shapes
from hooktrain.data.sources import load_source, prepare_data
from hooktrain.data.stream import TrainStream, build_train_stream
from hooktrain.data.val import ValLoader, build_val_loader

__all__ = [
    "DataConfig",
    "TrainDataConfig",
    "ValDataConfig",
    "HubSource",
    "ParquetSource",
    "FolderSource",
    "ShapesSource",
    "SHAPES_CLASSES",
    "SHAPES_PALETTE",
    "generate_shapes",
    "load_source",
    "prepare_data",
    "build_train_stream",
    "TrainStream",
    "build_val_loader",
    "ValLoader",
    "convert_folder",
]
