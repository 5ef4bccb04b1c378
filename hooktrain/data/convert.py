"""``hooktrain data convert``: an images/annotations folder to parquet shards.

The output is laid out like a Hub dataset repo, ``OUT/data/<split>-0000i-of-0000n.parquet``
with ``image`` and ``annotation`` columns typed ``datasets.Image()`` (the bytes of the
original files, not re-encoded), so it can be streamed locally (``type: hub, path: OUT`` or
``type: parquet, data_files: OUT/data/train-*.parquet``) or pushed to the Hub as is
(``huggingface-cli upload USER/NAME OUT --repo-type dataset``).

With a palette (``--palette``), colour masks are turned into class indices on the way
(:func:`hooktrain.data.palette.map_colours`: colour ``i`` of the palette becomes index ``i``)
and written as single-channel PNG bytes; masks that already hold indices (greyscale, 16-bit or
palette-indexed PNGs, as training reads them) are copied as they are. A colour that is not in
the palette stops the conversion with the colours and where they occur.

A conversion that stops on an error removes the shards it wrote, so a rerun starts clean.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from hooktrain.data.parquet import write_image_shard
from hooktrain.data.folder import folder_pairs
from hooktrain.data.labels import decode_mask
from hooktrain.data.palette import Palette, decode_colour_mask, map_colours
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
    palette: Palette | None = None,
    img_suffix: str | None = None,
    seg_map_suffix: str = ".png",
) -> dict[str, list[Path]]:
    """Write parquet shards of a segmentation folder; return the files per output split.

    ``source`` is either a dataset root in the ADEChallengeData2016 layout
    (``images/<split>/*.jpg`` + ``annotations/<split>/*.png``; every split found is
    converted, or only ``split``) or, with ``annotations_dir``, a directory of images whose
    PNG masks share their file stems (written as ``split``, default ``train``).
    Images and masks pair as a folder source pairs them
    (:func:`hooktrain.data.folder.folder_pairs`, sub-folders included): the image
    ``<name><img_suffix>`` (None: any image extension) goes with the mask
    ``<name><seg_map_suffix>``, e.g. ``_leftImg8bit.png`` and ``_gtFine_labelIds.png`` for
    Cityscapes. With ``palette``, colour masks are written as class-index PNGs (see the module
    docstring).
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
    try:
        for name, images, annotations in jobs:
            pairs = folder_pairs(images, annotations, f"convert {images}",
                                 img_suffix=img_suffix, seg_map_suffix=seg_map_suffix)
            if list(out.glob(f"{name}-*.parquet")):
                raise UserError(
                    f"{out} already holds {name} shards; remove them or pick another OUT"
                )
            written[name] = []
            _write_shards(pairs, out, name, min(shards, len(pairs)), palette, written[name])
    except UserError:
        for path in (path for files in written.values() for path in files):
            path.unlink(missing_ok=True)  # all or nothing: a rerun starts clean
        raise
    return written


def _write_shards(pairs: list[tuple[str, str]], out: Path, split: str, shards: int,
                  palette: Palette | None, files: list[Path]) -> None:  # fmt: skip
    """Write ``shards`` files of ``pairs``, appending each path to ``files`` once written."""
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(pairs), shards + 1).astype(int)
    for i in range(shards):
        chunk = pairs[bounds[i] : bounds[i + 1]]
        table = {
            "image": [{"bytes": Path(img).read_bytes(), "path": Path(img).name} for img, _ in chunk],
            "annotation": [_annotation(ann, palette) for _, ann in chunk],
        }
        path = out / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        write_image_shard(path, table, row_group_size=_ROWS_PER_ROW_GROUP)
        files.append(path)


def _annotation(path: str, palette: Palette | None) -> dict:
    """The annotation cell of ``path``: its bytes, or with a palette, index-mask PNG bytes."""
    raw = Path(path).read_bytes()
    if palette is not None:
        raw = palette_mask_png(raw, palette, path)
    return {"bytes": raw, "path": Path(path).name}


def palette_mask_png(raw: bytes, palette: Palette, where: str) -> bytes:
    """Encoded mask ``raw`` as single-channel PNG bytes of class indices.

    A colour mask is mapped through ``palette``; a mask that training already reads as indices
    (:func:`~hooktrain.data.labels.decode_mask` accepts it) is returned unchanged. ``where``
    (the file) names the mask in errors.
    """
    try:
        decode_mask(raw, where)
        return raw  # already one class index per pixel
    except UserError as exc:
        not_indices = exc
    rgb = decode_colour_mask(raw)
    if rgb is None or rgb.ndim != 3:
        raise not_indices  # undecodable, or single-channel but not integer
    if rgb.dtype != np.uint8:
        raise UserError(
            f"--palette: {where} has {rgb.dtype} colour channels; palette masks must have 8 bits "
            "per channel"
        )
    mapping = map_colours(rgb, palette)
    if mapping.unknown:
        shown = ", ".join(f"{u.describe()} ({u.pixels} px)" for u in mapping.unknown)
        more = ", ..." if mapping.unknown_colours > len(mapping.unknown) else ""
        raise UserError(
            f"--palette: {where} has {mapping.unknown_colours} colour(s) that are not in the "
            f"palette ({palette.source}, {len(palette.colours)} colours): {shown}{more}; add "
            "each colour to the palette at its class index, or fix the masks"
        )
    return cv2.imencode(".png", mapping.index)[1].tobytes()
