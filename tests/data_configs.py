"""The DataConfig the stream tests build around parquet splits in a directory: ``make_cfg``, for
tests/data/test_data.py and the fresh processes it starts."""

from __future__ import annotations

from pathlib import Path

from hooktrain.data import DataConfig

NUM_CLASSES = 250
PLAIN = {"scale": [8, 8], "ratio_range": [1.0, 1.0], "crop_size": [8, 8], "flip_prob": 0.0,
         "photometric": False, "cat_max_ratio": 1.0}  # fmt: skip


def make_cfg(root: Path, *, batch=2, workers=0, buffer=5, pipeline=PLAIN, val_batch=1,
             val_workers=0, **data) -> DataConfig:  # fmt: skip
    source = {"type": "parquet", "data_files": str(root / "data" / "train-*.parquet")}
    val_source = {"type": "parquet", "data_files": str(root / "data" / "validation-*.parquet")}
    return DataConfig.model_validate({
        "num_classes": NUM_CLASSES,
        "train": {"source": source, "batch_size": batch, "num_workers": workers,
                  "shuffle_buffer": buffer, "pipeline": pipeline},
        "val": {"source": val_source, "batch_size": val_batch, "num_workers": val_workers,
                "pipeline": {"scale": [8, 8]}},
        **data,
    })  # fmt: skip
