"""``hooktrain data convert``: an images/annotations folder to parquet shards.

The output is laid out like a Hub dataset repo, ``OUT/data/<split>-0000i-of-0000n.parquet``
with ``image`` and ``annotation`` columns typed ``datasets.Image()`` (the bytes of the
original files, not re-encoded), so it can be streamed locally (``type: hub, path: OUT`` or
``type: parquet, data_files: OUT/data/train-*.parquet``) or pushed to the Hub as is
(``huggingface-cli upload USER/NAME OUT --repo-type dataset``).

With a palette (``--palette``), colour masks are turned into class indices on the way
(:func:`hooktrain.tools.palette.map_colours`: colour ``i`` of the palette becomes index ``i``)
and written as single-channel PNG bytes; masks that already hold indices (greyscale, 16-bit or
palette-indexed PNGs, as training reads them) are copied as they are. A colour that is not in
the palette stops the conversion with the colours and where they occur.

Every example goes through the checks training applies (:func:`check_example`): a mask training
would refuse (colour channels, an undecodable file, labels beyond the palette's classes, a size
other than its image's) stops the conversion with one line naming the file. Shards are written
to a staging directory beside ``OUT`` and moved into ``OUT/data`` only once every example has
passed, so a conversion that stops leaves ``OUT`` as it was.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from hooktrain.data.folder import folder_pairs
from hooktrain.data.labels import LabelMapper, decode_image, decode_mask
from hooktrain.data.parquet import write_image_shard
from hooktrain.errors import UserError
from hooktrain.tools.palette import Palette, decode_colour_mask, map_colours

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
    planned = []
    for name, images, masks in jobs:
        pairs = folder_pairs(images, masks, f"convert {images}",
                             img_suffix=img_suffix, seg_map_suffix=seg_map_suffix)  # fmt: skip
        if list(out.glob(f"{name}-*.parquet")):
            raise UserError(f"{out} already holds {name} shards; remove them or pick another OUT")
        planned.append((name, pairs))
    staging = _staging_dir(out)
    try:
        staged = {name: _write_shards(pairs, staging, name, min(shards, len(pairs)), palette)
                  for name, pairs in planned}  # fmt: skip
        return _move_into(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_dir(out: Path) -> Path:
    """A new hidden directory in the nearest existing directory above ``out``: on the file
    system the shards are finally moved to, and removed before ``convert_folder`` returns."""
    parent = out.absolute().parent
    while not parent.is_dir():
        parent = parent.parent
    try:
        return Path(tempfile.mkdtemp(prefix=".hooktrain-convert-", dir=parent))
    except OSError as err:
        raise UserError(f"convert: cannot write in {parent} ({err.strerror or err}); pick another OUT") from None


def _move_into(staged: dict[str, list[Path]], out: Path) -> dict[str, list[Path]]:
    """Move every staged shard into ``out``; returns their new paths per split."""
    out.mkdir(parents=True, exist_ok=True)
    moved: dict[str, list[Path]] = {}
    for split, files in staged.items():
        moved[split] = [out / f.name for f in files]
        for source, target in zip(files, moved[split], strict=True):
            os.replace(source, target)
    return moved


def _write_shards(pairs: list[tuple[str, str]], out: Path, split: str, shards: int,
                  palette: Palette | None) -> list[Path]:  # fmt: skip
    """Write ``shards`` files of checked ``pairs`` into ``out``; returns their paths."""
    bounds = np.linspace(0, len(pairs), shards + 1).astype(int)
    files = []
    for i in range(shards):
        cells = [_example_cells(img, ann, palette) for img, ann in pairs[bounds[i] : bounds[i + 1]]]
        table = {"image": [image for image, _ in cells], "annotation": [ann for _, ann in cells]}
        path = out / f"{split}-{i:05d}-of-{shards:05d}.parquet"
        write_image_shard(path, table, row_group_size=_ROWS_PER_ROW_GROUP)
        files.append(path)
    return files


def _example_cells(image_path: str, mask_path: str, palette: Palette | None) -> tuple[dict, dict]:
    """The ``image`` and ``annotation`` cells of one pair, after :func:`check_example`."""
    image = _read(image_path)
    mask = _read(mask_path)
    if palette is not None:
        mask = palette_mask_png(mask, palette, mask_path)
    check_example(image, mask, image_path, mask_path, palette=palette)
    return {"bytes": image, "path": Path(image_path).name}, {"bytes": mask, "path": Path(mask_path).name}


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"convert: cannot read {path} ({err.strerror or err}); make it readable or remove it") from None


def check_example(image: bytes, mask: bytes, image_path: str, mask_path: str, *,
                  palette: Palette | None = None) -> None:  # fmt: skip
    """Refuse, as training would, a pair whose encoded ``mask`` is not one class index per pixel
    (:func:`~hooktrain.data.labels.decode_mask`), holds labels that are not classes of
    ``palette`` (nor 255, ignored; the ``LabelMapper`` of training with its defaults), or is not
    the size of its image."""
    try:
        decoded = decode_mask(mask, mask_path)
    except UserError as exc:
        if palette is None and _is_colour(mask):
            raise UserError(f"{exc}; or convert colour masks with --palette COLOURS") from None
        raise
    if palette is not None:
        _check_labels(decoded, mask_path, palette)
    height, width = _image_size(image, image_path)
    if decoded.shape != (height, width):
        raise UserError(
            f"convert: the image {image_path} is {height}x{width} but its annotation {mask_path} is "
            f"{decoded.shape[0]}x{decoded.shape[1]}; every mask must have its image's height and width"
        )


def _check_labels(mask: np.ndarray, mask_path: str, palette: Palette) -> None:
    classes = LabelMapper(len(palette.colours))
    values, out_of_range = classes.map_values(np.unique(mask))
    if out_of_range.any():
        shown = ", ".join(str(int(v)) for v in values[out_of_range][:10])
        raise UserError(
            f"--palette: {mask_path} holds class indices [{shown}] but the palette ({palette.source}) has "
            f"{classes.num_classes} colours (indices 0-{classes.num_classes - 1}, and {classes.ignore_index} "
            "for ignored pixels); fix the mask, or add those classes' colours to the palette"
        )


def _is_colour(mask: bytes) -> bool:
    decoded = decode_colour_mask(mask)
    return decoded is not None and decoded.ndim == 3


# EXIF orientations that turn the picture by 90 degrees (the decoder applies them).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def _image_size(image: bytes, image_path: str) -> tuple[int, int]:
    """``(height, width)`` of the encoded image as training decodes it (EXIF orientation
    applied), from its header when PIL can read it, else by decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as header:
            width, height = header.size
            turned = header.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS
        return (width, height) if turned else (height, width)
    except (UnidentifiedImageError, OSError, ValueError):
        return decode_image(image, image_path).shape[:2]


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
