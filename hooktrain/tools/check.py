"""``hooktrain data check``: read the first examples of a recipe's data and diagnose them.

The examples come through the same code as training: the source is opened with
:func:`hooktrain.data.sources.open_source`, images and masks are decoded with
:func:`~hooktrain.data.labels.decode_image` and :func:`~hooktrain.data.labels.decode_mask`,
and mask values go through the recipe's :class:`~hooktrain.data.labels.LabelMapper`
(``reduce_zero_label``, then ``label_map``, then the range check). :func:`scan` counts what
they hold in a :class:`~hooktrain.tools.check_stats.DataStats`;
:mod:`hooktrain.tools.check_findings` diagnoses it (findings, class weights) and
:mod:`hooktrain.tools.check_report` prints it as a report (columns, sizes, formats, pixels and
images per class, class weights) followed by the findings. A finding is either a *problem*
(training would stop, or would learn wrong labels) or a *note*. :func:`check_data` raises a
one-line :class:`~hooktrain.errors.UserError` summing up the problems after printing the
report, so the CLI exits 2 when there are any. See docs/data-check.md.
"""

from __future__ import annotations

import io
import os
from itertools import islice
from typing import Any

import numpy as np

from hooktrain.errors import UserError, did_you_mean, first_line
from hooktrain.tools.check_findings import diagnose, recipe_palette
from hooktrain.tools.check_report import format_report
from hooktrain.tools.check_stats import SHOWN, DataStats, Finding

__all__ = ["DEFAULT_LIMIT", "DataStats", "check_data", "scan"]

DEFAULT_LIMIT = 200
_PIL_MODES = {  # PIL mode -> what it stores
    "1": "1 channel, 1 bit", "L": "1 channel, uint8", "P": "palette indices, uint8",
    "LA": "2 channels, uint8", "RGB": "3 channels, uint8", "RGBA": "4 channels, uint8",
    "CMYK": "4 channels, uint8", "YCbCr": "3 channels, uint8", "I": "1 channel, int32",
    "I;16": "1 channel, uint16", "I;16B": "1 channel, uint16", "F": "1 channel, float32",
}  # fmt: skip


# -- the command --------------------------------------------------------------------------


def check_data(
    recipe_path: str | os.PathLike,
    cfg_options: list[str] | None = None,
    *,
    split: str = "train",
    limit: int = DEFAULT_LIMIT,
    recipe_arg: str | None = None,
) -> list[Finding]:
    """Check the first ``limit`` examples of the recipe's ``split`` ("train" or "val") source.

    Prints the report on stdout and returns the findings; raises a one-line ``UserError``
    after the report when there are problems (the CLI's exit 2). ``recipe_arg`` is how the
    recipe is named in the pasted command lines (default: ``recipe_path``).
    """
    from hooktrain.recipe.schema import load_recipe

    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    recipe = load_recipe(recipe_path, cfg_options)
    where, source = _source(recipe.data, split)
    print(f"reading up to {limit} examples of {where} ({source.type}) ...", flush=True)
    ds, image_column, annotation_column = _open(source, where)
    stats = scan(ds, image_column, annotation_column, recipe.data, limit, where)
    findings = diagnose(stats, recipe, source, recipe_arg or str(recipe_path))
    print(format_report(stats, recipe, findings, where=where, source_type=source.type,
                        recipe_arg=recipe_arg or str(recipe_path)), end="")  # fmt: skip
    problems = [f for f in findings if f.problem]
    if problems:
        raise UserError(
            f"data check of {where} ({stats.read} examples): "
            + "; ".join(p.summary for p in problems)
            + " (the report above has the details)"
        )
    return findings


def _source(data, split: str) -> tuple[str, Any]:
    """``(recipe key, source)`` of the split to check."""
    if split == "train":
        return "data.train.source", data.train.source
    if split == "val":
        if data.val is None:
            raise UserError("--split val: the recipe has no data.val; set data.val.source or "
                            "check the train split")  # fmt: skip
        return "data.val.source", data.val.source
    hint = did_you_mean(split, ["train", "val"])
    raise UserError(f"--split is {split!r}{hint}; use train or val")


def _open(source, where: str):
    """Open the source with every column; Image columns cast to raw bytes. A non-streaming Hub
    source is streamed (nothing is downloaded), a shapes source is generated if missing."""
    from datasets import Image

    from hooktrain.data.shapes import generate_shapes
    from hooktrain.data.sources import open_source
    from hooktrain.recipe.data import HubSource, ShapesSource

    if isinstance(source, HubSource) and not source.streaming:
        source = source.model_copy(update={"streaming": True})
    if isinstance(source, ShapesSource):
        generate_shapes(source.root, **source.model_dump(exclude={"type", "root", "split"}))
    ds, image_column, annotation_column = open_source(source, where=where)
    if ds.features is not None:
        _check_columns(list(ds.features), image_column, annotation_column, where)
        for column in (image_column, annotation_column):
            if isinstance(ds.features[column], Image):
                ds = ds.cast_column(column, Image(decode=False))
    return ds, image_column, annotation_column


def _check_columns(columns: list[str], image_column: str, annotation_column: str,
                   where: str) -> None:  # fmt: skip
    for key, column in (("image_column", image_column), ("annotation_column", annotation_column)):
        if column not in columns:
            raise UserError(
                f"{where}: column '{column}' not found{did_you_mean(column, columns)}; the "
                f"source has columns {columns}; set {where}.{key} to the right one"
            )

# -- scanning -----------------------------------------------------------------------------


def scan(ds, image_column: str, annotation_column: str, data, limit: int,
         where: str = "data.train.source") -> DataStats:  # fmt: skip
    """Decode the first ``limit`` examples of ``ds`` as training does and count what they hold.

    ``data`` is the recipe's ``DataConfig`` (classes, label handling, palette); ``where`` names
    the source in errors.
    """
    from hooktrain.data.labels import LabelMapper

    stats = DataStats(data.num_labels, data.ignore_index)
    stats.columns = {name: _describe_feature(f) for name, f in (ds.features or {}).items()}
    mapper = LabelMapper(data.num_classes, data.ignore_index, data.reduce_zero_label,
                         data.label_map, out_of_range="ignore", mask_scale=data.mask_scale)  # fmt: skip
    palette = recipe_palette(data)
    rows = iter(ds)
    try:
        for i, row in enumerate(islice(rows, limit)):
            if not stats.columns:  # features unknown: describe the first example's values
                stats.columns = {k: type(v).__name__ for k, v in row.items()}
                _check_columns(list(row), image_column, annotation_column, where)
            stats.read += 1
            _scan_example(stats, row[image_column], row[annotation_column], i, mapper, palette,
                          data.in_channels)  # fmt: skip
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stop the source's generators now, not at interpreter exit
    return stats


def _scan_example(stats: DataStats, image_value, mask_value, row: int, mapper, palette,
                  channels: int = 3) -> None:  # fmt: skip
    """Decode one example and add it to ``stats``; what concerns the mask is listed under the
    mask's file name, the rest under the image's. ``channels`` is ``data.in_channels``."""
    from hooktrain.data.labels import WrongImage, decode_image, decode_mask

    example_id, mask_id = _example_id(image_value, row), _example_id(mask_value, row)
    try:
        image = decode_image(image_value, example_id, channels)
    except WrongImage as exc:  # training stops at it; count it as it is stored
        stats.wrong_images.append((example_id, first_line(exc)))
        try:
            image = decode_image(image_value, example_id, None)
        except WrongImage:
            return
    except Exception as exc:  # noqa: BLE001 - training skips it as corrupt, whatever the cause
        stats.corrupt.append((example_id, f"image: {first_line(exc)}"))
        return
    stats.image_kinds[_image_kind(image)] += 1
    try:
        mask = decode_mask(mask_value, mask_id)
    except UserError as exc:
        mask = _unusable_mask(stats, mask_value, mask_id, exc, palette)
        if mask is None:
            return
    else:
        _count_index_mask(stats, mask, mask_id, mapper)
    stats.image_formats[_stored_format(image_value)] += 1
    stats.mask_formats[_stored_format(mask_value)] += 1
    stats.image_sizes[image.shape[:2]] += 1
    stats.mask_sizes[mask.shape[:2]] += 1
    if mask.shape[:2] != image.shape[:2]:
        stats.size_mismatch.append((example_id, image.shape[:2], mask.shape[:2]))


def _unusable_mask(stats: DataStats, value, example_id: str, error: UserError, palette):
    """A mask ``decode_mask`` refused: count a colour mask, or record it as corrupt or bad.

    Returns the decoded array when the example should still count in the sizes."""
    from hooktrain.tools.palette import map_colours

    colour = _colour_array(value)
    if colour is None:
        stats.corrupt.append((example_id, f"annotation: {first_line(error)}"))
        return None
    if colour.ndim != 3 or colour.dtype != np.uint8:
        stats.bad_masks.append((example_id, first_line(error)))
        return None
    if np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(
        colour[:, :, 0], colour[:, :, 2]
    ):
        stats.grey_rgb_masks.append(example_id)
        return colour
    stats.colour_masks.append(example_id)
    packed = (colour[..., 0].astype(np.uint32) << 16) | (colour[..., 1].astype(np.uint32) << 8)
    keys, counts = np.unique(packed | colour[..., 2], return_counts=True)
    for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
        stats.colours[(key >> 16, (key >> 8) & 255, key & 255)] += count
    if palette is not None:
        mapping = map_colours(colour, palette, max_unknown=SHOWN)
        for u in mapping.unknown:
            stats.unknown_colours.setdefault(u.colour, (example_id, u.x, u.y))
            stats.unknown_colour_pixels[u.colour] += u.pixels
        if not mapping.unknown_colours:  # the converted mask: class indices as they are
            _count_classes(stats, *np.unique(mapping.index, return_counts=True))
    return colour


def _colour_array(value) -> np.ndarray | None:
    """The mask as OpenCV decodes it with its channels (RGB), or None if undecodable."""
    from PIL import Image as PILImage

    from hooktrain.data.sources import read_bytes
    from hooktrain.tools.palette import decode_colour_mask

    if isinstance(value, PILImage.Image):
        return np.asarray(value.convert("RGB") if value.mode not in ("L", "I;16", "I") else value)
    if isinstance(value, np.ndarray):
        return value
    try:
        raw = read_bytes(value)
    except (OSError, ValueError, AttributeError):
        return None
    return decode_colour_mask(raw) if raw else None


def _count_index_mask(stats: DataStats, mask: np.ndarray, example_id: str, mapper) -> None:
    """Count the raw values of an index mask (their pixels, those on a boundary or the image
    border, the mask) and the classes they map to."""
    values, counts = _histogram(mask)
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        stats.raw_pixels[v] += c
        stats.raw_images[v] += 1
    edge_values, edge_counts = _histogram(mask[_edge_pixels(mask)])
    for v, c in zip(edge_values.tolist(), edge_counts.tolist(), strict=True):
        stats.raw_edge_pixels[v] += c
    stats.index_masks += 1
    mapped, bad = mapper.map_values(values)
    if bad.any():
        for v, c in zip(values[bad].tolist(), counts[bad].tolist(), strict=True):
            stats.out_of_range[v] += c
        stats.out_of_range_ids.append(example_id)
    ignored = ~bad & (mapped == stats.ignore_index)
    stats.ignored_pixels += int(counts[ignored].sum())
    stats.total_pixels += int(counts[bad | ignored].sum())  # the labelled ones are added below
    valid = ~(bad | ignored)
    _count_classes(stats, mapped[valid], counts[valid])


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``values`` and how often each occurs (a bincount for uint8)."""
    if values.dtype == np.uint8:
        counts = np.bincount(values.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(values, return_counts=True)


def _edge_pixels(mask: np.ndarray) -> np.ndarray:
    """Where ``mask`` touches another value (4-neighbours) or the image border: void and
    'other' labels gather there (see check_findings' clues)."""
    edge = np.zeros(mask.shape, bool)
    if not mask.size:
        return edge
    across, down = mask[:, 1:] != mask[:, :-1], mask[1:] != mask[:-1]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:] |= down
    edge[:-1] |= down
    edge[[0, -1]] = True
    edge[:, [0, -1]] = True
    return edge


def _count_classes(stats: DataStats, classes: np.ndarray, counts: np.ndarray) -> None:
    """Add one image's labelled pixels per class (``classes`` may repeat)."""
    per_class = np.bincount(classes.astype(np.int64), weights=counts, minlength=stats.num_classes)
    per_class = per_class.astype(np.int64)[: stats.num_classes]
    stats.class_pixels += per_class
    present = per_class > 0
    stats.class_images[present] += 1
    stats.class_context[present] += int(per_class.sum())
    stats.total_pixels += int(per_class.sum())


def _image_kind(image: np.ndarray) -> str:
    """``4 channels, uint16``: a decoded image's channel count and dtype."""
    channels = image.shape[2] if image.ndim == 3 else 1
    return f"{channels} channel{'s' * (channels != 1)}, {image.dtype}"


def _example_id(value, row: int) -> str:
    """``row N`` (the position in the source's order), with the cell's file name if known."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"{path} (row {row})" if path else f"row {row}"


def _stored_format(value) -> str:
    """How a cell is stored, from the file header: e.g. ``JPEG RGB (3 channels, uint8)``."""
    from PIL import Image as PILImage

    from hooktrain.data.sources import read_bytes

    if isinstance(value, PILImage.Image):
        return f"{value.format or 'decoded'} {value.mode} ({_PIL_MODES.get(value.mode, '?')})"
    if isinstance(value, np.ndarray):
        channels = value.shape[2] if value.ndim == 3 else 1
        return f"array ({channels} channel{'s' * (channels > 1)}, {value.dtype})"
    try:
        with PILImage.open(io.BytesIO(read_bytes(value))) as img:
            return f"{img.format} {img.mode} ({_PIL_MODES.get(img.mode, img.mode)})"
    except Exception:  # noqa: BLE001 - OpenCV decoded it; PIL just cannot name it
        return "other (decoded by OpenCV)"


def _describe_feature(feature) -> str:
    from datasets import ClassLabel, Image, Value

    if isinstance(feature, Image):
        return "Image"
    if isinstance(feature, ClassLabel):
        return f"ClassLabel ({feature.num_classes} names)"
    if isinstance(feature, Value):
        return feature.dtype
    text = repr(feature)
    return text if len(text) <= 60 else text[:57] + "..."
