"""``hooktrain data convert``: an images/annotations folder to parquet shards.

The output is laid out like a Hub dataset repo, ``OUT/data/<split>-0000i-of-0000n.parquet``
with ``image`` and ``annotation`` columns typed ``datasets.Image()`` (the bytes of the
original files, not re-encoded), so it can be streamed locally (``type: hub, path: OUT`` or
``type: parquet, data_files: OUT/data/train-*.parquet``) or pushed to the Hub as is
(``huggingface-cli upload USER/NAME OUT --repo-type dataset``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hooktrain.data.parquet import write_image_shard
from hooktrain.data.folder import folder_pairs
from hooktrain.errors import UserError

# ADEChallengeData2016 names its splits training/validation; the Hub says train/validation.
_HUB_SPLIT = {"training": "train", "validation": "validation"}
_ROWS_PER_ROW_GROUP = 100


def convert_folder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shards: int = 8,
    split: str | None = None,
    annotations_dir: str | os.PathLike | None = None,
) -> dict[str, list[Path]]:
    """Write parquet shards of a segmentation folder; return the files per output split.

    ``source`` is either a dataset root in the ADEChallengeData2016 layout
    (``images/<split>/*.jpg`` + ``annotations/<split>/*.png``; every split found is
    converted, or only ``split``) or, with ``annotations_dir``, a directory of images whose
    PNG masks share their file stems (written as ``split``, default ``train``).
    """
    source = Path(source)
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    if annotations_dir is not None:
        jobs = [(split or "train", source, Path(annotations_dir))]
    else:
        if not (source / "images").is_dir() or not (source / "annotations").is_dir():
            raise UserError(
                f"{source} has no images/ and annotations/ directories; pass a dataset root "
                "in the ADEChallengeData2016 layout, or an images directory with --annotations"
            )
        splits = [split] if split else sorted(p.name for p in (source / "images").iterdir()
                                              if p.is_dir())  # fmt: skip
        if not splits:
            raise UserError(f"{source / 'images'} has no split directories (e.g. training/)")
        jobs = [(_HUB_SPLIT.get(s, s), source / "images" / s, source / "annotations" / s)
                for s in splits]  # fmt: skip
    out = Path(out_dir) / "data"
    written: dict[str, list[Path]] = {}
    for name, images, annotations in jobs:
        pairs = folder_pairs(images, annotations, f"convert {images}")
        if list(out.glob(f"{name}-*.parquet")):
            raise UserError(f"{out} already holds {name} shards; remove them or pick another OUT")
        written[name] = _write_shards(pairs, out, name, min(shards, len(pairs)))
    return written


def _write_shards(pairs: list[tuple[str, str]], out: Path, split: str, shards: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(pairs), shards + 1).astype(int)
    files = []
    for i in range(shards):
        chunk = pairs[bounds[i] : bounds[i + 1]]
        table = {
            "image": [{"bytes": Path(img).read_bytes(), "path": Path(img).name} for img, _ in chunk],
            "annotation": [
                {"bytes": Path(ann).read_bytes(), "path": Path(ann).name} for _, ann in chunk
            ],
        }
        path = out / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        write_image_shard(path, table, row_group_size=_ROWS_PER_ROW_GROUP)
        files.append(path)
    return files
