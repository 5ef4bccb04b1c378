"""``hooktrain browse``: the samples exactly as the model sees them after the pipeline, as PNGs.

hooktrain's counterpart of MMSegmentation's ``tools/analysis_tools/browse_dataset.py``: check
what the augmentation does to your data before spending a run on it.

Where the samples come from
    ``--split train``: the real training stream (:func:`hooktrain.data.build_train_stream` with
    ``train.seed``, rank 0 of 1), with ``data.train.num_workers`` set to 0 so browsing starts at
    once (with ``data.train.gpu_augment`` the uint8 batches get their photometric distortion
    and normalisation on the CPU from the model's input stage,
    :class:`hooktrain.models.input_stage.InputStage`, which training runs on the device). Each example's augmentation is drawn from
    ``(seed, pass, shard, row)`` only, so a sample shows exactly the crop, flip and colour
    changes training gives that row in that pass; the *order* is the one of a single-reader
    stream (with workers, each reader owns other rows), so the first samples need not be a
    run's first batch.
    ``--split val``: the validation loader (:func:`hooktrain.data.build_val_loader`, one
    process, ``data.val.num_workers`` set to 0), examples in their global index order.
    Browsing stops after ``--num`` samples (fewer when the validation split is smaller).

What each PNG shows (``train_000.png``, ``train_001.png``, ... or ``val_000.png``, ...)
    A caption strip on top, then three panels side by side: ``image | label | overlay``.

    * image: the batch's float tensor de-normalised, ``x * std + mean`` with ``data.mean`` /
      ``data.std``, rounded and clipped to 0..255, RGB (1 channel as grey, more than 3 by the
      first three, 16-bit data stretched: :mod:`hooktrain.data.preview`). Train samples show the whole crop,
      padding included (padding is 0 in the tensor, so it shows as the mean colour); val
      samples are cut out of the batch's padding to the image's own size.
    * label: every class in its ``data.palette`` colour (:attr:`DataConfig.colours`); pixels
      equal to ``data.ignore_index`` (including the padding of train crops) in the *ignore
      colour*: white, or the first of magenta, cyan, yellow, grey that is not in the palette
      when white is (:func:`ignore_colour`).
    * overlay: the image blended half and half with the label colours, ignore pixels drawn
      opaque in the ignore colour.

    Val masks keep the original size while the pipeline resizes the image; the mask is
    resized to the image's size with nearest-neighbour interpolation, so the panels show the
    image exactly as the model sees it. Samples smaller than 256 pixels are enlarged by an
    integer factor with nearest-neighbour interpolation (every pixel becomes a k x k block,
    nothing is interpolated; :func:`zoom_for`).

    The caption names the split and the sample number, then the example: for train the pass
    of the stream it came from and its id (``train_000012.png (shard 2 row 0)``: the file
    name when the source has one, then the shard and row it was read from); for val the
    example's global index in the split and the same kind of id. A second line gives the
    panel size (and for val the mask's original size) and the classes present.

PNGs are written with OpenCV (RGB converted to OpenCV's BGR); existing files of the same
names in ``--out`` are replaced. ``--out`` is created only once the first sample has been
read, so a bad recipe or data source leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hooktrain.errors import UserError

if TYPE_CHECKING:
    from hooktrain.recipe.data import DataConfig

SPLITS = ("train", "val")
MIN_PANEL = 256  # samples smaller than this are enlarged by an integer factor (nearest)
GAP = 4  # pixels between panels, in the strip colour
ALPHA = 0.5  # weight of the label colours in the overlay panel
STRIP_COLOUR = (32, 32, 32)
TEXT_COLOUR = (255, 255, 255)
IGNORE_CANDIDATES = ((255, 255, 255), (255, 0, 255), (0, 255, 255), (255, 255, 0), (128, 128, 128))
_FONT_SCALE, _LINE_HEIGHT, _MARGIN = 0.5, 20, 6


@dataclass
class Sample:
    """One sample after the pipeline: ``image`` HxWx3 uint8 RGB as the model sees it, ``mask``
    HxW int class indices aligned with it, and the caption's lines."""

    image: np.ndarray
    mask: np.ndarray
    caption: list[str]


# -- entry point ---------------------------------------------------------------------------


def browse(
    recipe_path: str | os.PathLike,
    cfg_options: list[str] | None = None,
    *,
    split: str = "train",
    num: int = 8,
    out: str | os.PathLike,
) -> list[Path]:
    """Write ``num`` samples of ``split`` after the recipe's pipeline as PNGs into ``out``
    (created); returns the files written, in order. See the module docstring."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the PNGs (it is created if missing)")
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(recipe_path, cfg_options)
    if split == "val" and recipe.data.val is None:
        raise UserError("--split val: the recipe has no data.val section; add one or browse --split train")
    data = _without_workers(recipe.data)
    samples = train_samples(data, recipe.train.seed) if split == "train" else val_samples(data)
    with closing(samples):  # stops the stream as soon as ``num`` samples are written
        first = next(samples, None)  # a bad source fails here, before anything is created
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
        chosen = [] if first is None else islice(chain([first], samples), num)
        return [_write(out / f"{split}_{n:03d}.png", render(sample, data)) for n, sample in enumerate(chosen)]


def _without_workers(data: DataConfig) -> DataConfig:
    """``data`` with no DataLoader worker processes for either split (browsing reads a few
    examples; starting workers would cost more than it saves)."""
    update: dict[str, Any] = {"train": data.train.model_copy(update={"num_workers": 0})}
    if data.val is not None:
        update["val"] = data.val.model_copy(update={"num_workers": 0})
    return data.model_copy(update=update)


# -- samples -------------------------------------------------------------------------------


def train_samples(data: DataConfig, seed: int) -> Generator[Sample, None, None]:
    """The training stream's examples, one by one: the whole padded crop each."""
    from hooktrain.data import build_train_stream, prepare_data
    from hooktrain.models.input_stage import InputStage

    prepare_data(data)
    stream = build_train_stream(data, seed=seed, rank=0, world_size=1)
    input_stage = InputStage(data.mean, data.std)
    number = 0
    try:
        for batch in stream:
            # gpu_augment: the same distortion and normalisation as training, here on the CPU
            batch["image"], _ = input_stage(batch, "cpu")
            for i in range(batch["image"].shape[0]):
                image = denormalise(batch["image"][i].numpy(), data.mean, data.std)
                mask = batch["mask"][i].numpy()
                where = _train_where(batch, i)
                yield Sample(image, mask, [f"train sample {number}: {where}", _details(image, mask, data)])
                number += 1
    finally:
        stream.close()


def _train_where(batch: dict[str, Any], i: int) -> str:
    """``pass P, <example id>`` of the batch's ``i``-th example (when the stream says)."""
    if "example_ids" not in batch:
        return "source row unknown"
    return f"pass {batch['passes'][i]}, {batch['example_ids'][i]}"


def val_samples(data: DataConfig) -> Generator[Sample, None, None]:
    """The validation loader's examples, one by one, each cut out of the batch's padding,
    its mask resized (nearest) to the image's size."""
    from hooktrain.data import build_val_loader, prepare_data

    prepare_data(data)
    number = 0
    for batch in build_val_loader(data, rank=0, world_size=1):
        for i in range(batch["image"].shape[0]):
            (h, w), (ori_h, ori_w) = batch["img_shapes"][i], batch["ori_shapes"][i]
            image = denormalise(batch["image"][i, :, :h, :w].numpy(), data.mean, data.std)
            mask = resize_mask(batch["mask"][i, :ori_h, :ori_w].numpy(), (h, w))
            index = int(batch["index"][i])
            example_id = batch["example_ids"][i] if "example_ids" in batch else "id unknown"
            caption = [f"val sample {number}: index {index}, {example_id}", _details(image, mask, data, (ori_h, ori_w))]
            yield Sample(image, mask, caption)
            number += 1


def _details(image: np.ndarray, mask: np.ndarray, data: DataConfig, original: tuple[int, int] | None = None) -> str:
    """The caption's second line: the panel size, the mask's original size, the classes."""
    h, w = image.shape[:2]
    size = f"{h}x{w}"
    if original is not None and tuple(original) != (h, w):
        size += f" (mask {original[0]}x{original[1]}, resized nearest)"
    present = [int(v) for v in np.unique(mask) if 0 <= v < data.num_labels]
    names = ", ".join(data.names[v] for v in present) or "none"
    ignored = " + ignore" if (mask == data.ignore_index).any() else ""
    return f"{size}; classes: {names}{ignored}"


# -- pixels --------------------------------------------------------------------------------


def denormalise(image: np.ndarray, mean, std) -> np.ndarray:
    """A normalised float ``[C, H, W]`` image back to ``H x W x 3`` uint8 RGB: ``x * std + mean``,
    rounded to the nearest integer, clipped to 0..255; 1 channel shown grey, more than 3 by
    the first three, 16-bit data stretched to 0..255 (:func:`hooktrain.data.preview.preview`)."""
    from hooktrain.data.preview import preview

    return preview(image, mean, std)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` resized to ``size = (h, w)`` with nearest-neighbour interpolation."""
    import cv2

    h, w = size
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)


def ignore_colour(palette: list[list[int]]) -> tuple[int, int, int]:
    """The colour of ignored pixels: the first of :data:`IGNORE_CANDIDATES` (white first)
    that no class uses."""
    used = {tuple(int(v) for v in colour) for colour in palette}
    return next((c for c in IGNORE_CANDIDATES if c not in used), IGNORE_CANDIDATES[0])


def colour_mask(mask: np.ndarray, palette: list[list[int]], ignore: tuple[int, int, int]) -> np.ndarray:
    """``H x W x 3`` uint8: each class in its palette colour, anything else (``ignore_index``,
    padding) in ``ignore``."""
    table = np.asarray(palette, np.uint8).reshape(-1, 3)
    valid = (mask >= 0) & (mask < len(table))
    out = np.empty((*mask.shape, 3), np.uint8)
    out[...] = ignore
    out[valid] = table[mask[valid]]
    return out


def overlay(image: np.ndarray, label: np.ndarray, ignored: np.ndarray, ignore: tuple[int, int, int]) -> np.ndarray:
    """The image blended with the label colours (:data:`ALPHA`); ignored pixels opaque."""
    blend = image.astype(np.float32) * (1 - ALPHA) + label.astype(np.float32) * ALPHA
    out = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    out[ignored] = ignore
    return out


def zoom_for(height: int, width: int) -> int:
    """The integer enlargement of a ``height x width`` sample: 1 from :data:`MIN_PANEL` up."""
    return max(1, MIN_PANEL // max(height, width, 1))


def render(sample: Sample, data: DataConfig) -> np.ndarray:
    """The sample's picture, ``H x W x 3`` uint8 RGB: caption strip over ``image | label |
    overlay``."""
    import cv2

    palette = data.colours
    ignore = ignore_colour(palette)
    valid = (sample.mask >= 0) & (sample.mask < data.num_labels)
    label = colour_mask(np.where(valid, sample.mask, -1), palette, ignore)
    panels = [sample.image, label, overlay(sample.image, label, ~valid, ignore)]
    k = zoom_for(*sample.image.shape[:2])
    if k > 1:
        panels = [cv2.resize(p, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST) for p in panels]
    h, w = panels[0].shape[:2]
    width = len(panels) * w + (len(panels) - 1) * GAP
    strip = caption_strip(sample.caption, width)
    canvas = np.empty((strip.shape[0] + h, width, 3), np.uint8)
    canvas[...] = STRIP_COLOUR
    canvas[: strip.shape[0]] = strip
    for n, panel in enumerate(panels):
        x = n * (w + GAP)
        canvas[strip.shape[0] :, x : x + w] = panel
    return canvas


def caption_strip(lines: list[str], width: int) -> np.ndarray:
    """The caption as white text on a dark strip ``width`` wide, long lines wrapped."""
    import cv2

    wrapped = [part for line in lines for part in _wrap(line, width - 2 * _MARGIN)]
    strip = np.empty((len(wrapped) * _LINE_HEIGHT + _MARGIN, width, 3), np.uint8)
    strip[...] = STRIP_COLOUR
    for n, text in enumerate(wrapped):
        baseline = (n + 1) * _LINE_HEIGHT - _MARGIN // 2
        cv2.putText(
            strip, text, (_MARGIN, baseline), cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, TEXT_COLOUR, 1, cv2.LINE_AA
        )
    return strip


def _text_width(text: str) -> int:
    import cv2

    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, 1)[0][0]


def _wrap(line: str, width: int) -> list[str]:
    """``line`` cut into pieces at most ``width`` pixels wide, at spaces where possible."""
    pieces: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate) <= width or not current:
            current = candidate
        else:
            pieces.append(current)
            current = word
        while _text_width(current) > width and len(current) > 1:  # one word too long: cut it
            cut = len(current) - 1
            while cut > 1 and _text_width(current[:cut]) > width:
                cut -= 1
            pieces.append(current[:cut])
            current = current[cut:]
    return [*pieces, current] if current else pieces or [""]


def _write(path: Path, picture: np.ndarray) -> Path:
    """Write an RGB picture as a PNG (OpenCV wants BGR)."""
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise UserError(f"--out: cannot write {path}; check the directory is writable")
    return path
