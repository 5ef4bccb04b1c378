"""Folder sources: image files and PNG annotations on disk, paired by file stem."""

from __future__ import annotations

import os
from pathlib import Path

from hooktrain.data.config import FolderSource
from hooktrain.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def folder_pairs(images_dir: Path, annotations_dir: Path, where: str) -> list[tuple[str, str]]:
    """``(image, annotation)`` paths paired by file stem, sorted by stem."""
    for key, d in (("images_dir", images_dir), ("annotations_dir", annotations_dir)):
        if not d.is_dir():
            raise UserError(
                f"{where}: {key} {d} is not a directory (relative paths resolve against the "
                f"working directory {os.getcwd()}); fix {where}.root or {where}.{key}"
            )
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in annotations_dir.iterdir() if p.suffix.lower() == ".png"}
    unpaired = sorted(images.keys() ^ masks.keys())
    if unpaired:
        which = "annotation" if unpaired[0] in images else "image"
        raise UserError(
            f"{where}: {len(unpaired)} files have no partner (e.g. '{unpaired[0]}' has no "
            f"{which}); images in {images_dir} and PNG annotations in {annotations_dir} "
            "must pair by file stem"
        )
    if not images:
        raise UserError(f"{where}: no images found in {images_dir}")
    return [(str(images[s].absolute()), str(masks[s].absolute())) for s in sorted(images)]


def folder_dirs(source: FolderSource) -> tuple[Path, Path]:
    """The images and annotations directories a folder source points at."""
    root = Path(source.root) if source.root is not None else None
    images = Path(source.images_dir) if source.images_dir else root / "images" / source.split
    annotations = (
        Path(source.annotations_dir)
        if source.annotations_dir
        else root / "annotations" / source.split
    )
    return images, annotations


def load_folder(source: FolderSource, where: str):
    """The folder source as a ``datasets.IterableDataset`` of raw ``image``/``annotation``
    values holding only paths (the loaders read the files)."""
    from datasets import Dataset, Features, Image

    pairs = folder_pairs(*folder_dirs(source), where)
    # Only paths go into the dataset: skipping examples never touches the files.
    table = {
        "image": [{"bytes": None, "path": img} for img, _ in pairs],
        "annotation": [{"bytes": None, "path": ann} for _, ann in pairs],
    }
    features = Features({"image": Image(decode=False), "annotation": Image(decode=False)})
    ds = Dataset.from_dict(table, features=features)
    return ds.to_iterable_dataset(num_shards=min(source.num_shards, len(pairs)))
