"""``hooktrain predict``: segment image files with an exported model.

Every image goes through :class:`hooktrain.deploy.segmenter.Segmenter` (the recipe's val pipeline, its
``model.inference``, :func:`hooktrain.models.inference.predicted_labels`), from a
``.safetensors`` export (PyTorch) or a ``.onnx`` one (onnxruntime).

- An ordinary image gives ``<stem>.png`` (colours of the recipe's palette) and
  ``<stem>_label.png`` (8-bit class indices).
- A TIFF (with rasterio installed), an image over :data:`TILE_ABOVE` pixels, or any image with
  ``tiled=True`` is predicted in tiles at its own resolution (:mod:`hooktrain.deploy.tiled`) and
  gives ``<stem>_label.tif``: a tiled, compressed GeoTIFF of class indices with the palette as
  its colour table and the input's CRS and transform, where nodata stays nodata (255); with
  ``probabilities=True`` also ``<stem>_probs.tif``, one uint8 band per class (probability x 255).
  See docs/huge-images.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hooktrain.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy"}
TIFF_SUFFIXES = {".tif", ".tiff"}
TILE_ABOVE = 4096 * 4096  # pixels; larger images are predicted in tiles
logger = logging.getLogger("hooktrain")


@dataclass
class TileOptions:
    """How tiled predictions run: whether to tile every image (``tiled``; None: TIFFs and large
    images), ``crop_size``/``stride``/``blend`` overriding the recipe's ``model.inference``
    (None: keep it), whether to write the probabilities, and whether to show a progress bar."""

    tiled: bool | None = None
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    blend: str | None = None
    probabilities: bool = False
    progress: bool = True


def find_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, or directories searched recursively)."""
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"predict: input {path} not found; give image files or directories")
    if not images:
        raise UserError(f"predict: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {inputs}")
    return images


def predict_images(
    model_file: str | os.PathLike,
    inputs: list[str],
    out_dir: str | os.PathLike,
    tiles: TileOptions | None = None,
    *,
    batch_size: int = 1,
) -> list[Path]:
    """Segment every image with a ``.safetensors`` or ``.onnx`` export into ``out_dir`` (see the
    module). Returns the colour PNGs' and label GeoTIFFs' paths. Refuses, before loading the
    model or writing anything, outputs that would overwrite an input image."""
    tiles = tiles or TileOptions()
    images = find_images(inputs)
    out_dir = Path(out_dir)
    tiled = [path for path in images if _is_tiled(path, tiles.tiled)]
    whole = [path for path in images if path not in tiled]
    outputs = output_paths(images, out_dir, tiled)
    written_pairs = [outputs[p] if p in whole or tiles.probabilities else outputs[p][:1] for p in images]
    refuse_overwriting_inputs(images, written_pairs)
    from hooktrain.deploy.segmenter import Segmenter

    segmenter = Segmenter.load(model_file, batch_size=batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = _segment(segmenter, whole, outputs)
    return written + [_segment_tiled(segmenter, path, outputs[path], tiles) for path in tiled]


def _is_tiled(path: Path, tiled: bool | None) -> bool:
    if tiled is not None:
        return tiled
    if path.suffix.lower() in TIFF_SUFFIXES and importlib.util.find_spec("rasterio") is not None:
        return True  # without rasterio (the geo extra), small TIFFs are predicted whole, as before
    if path.suffix.lower() == ".npy":
        return False
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            return True
        except OSError:
            return False  # not an image PIL reads: the whole-image path names the problem
    return width * height > TILE_ABOVE


def _segment(segmenter: Any, images: list[Path], outputs: dict[Path, tuple[Path, Path]]) -> list[Path]:
    """Write the colour and label PNG of each image to its ``outputs`` pair."""
    import cv2

    labels = segmenter.recipe.data.num_labels
    if images and labels > 256:
        raise UserError(f"predict: {labels} classes do not fit an 8-bit label PNG")
    written = []
    for path in images:
        colour_png, label_png = outputs[path]
        label = segmenter(path)
        cv2.imwrite(str(label_png), label)
        cv2.imwrite(str(colour_png), cv2.cvtColor(segmenter.colourize(label), cv2.COLOR_RGB2BGR))
        written.append(colour_png)
    return written


def _segment_tiled(segmenter: Any, path: Path, outputs: tuple[Path, Path], tiles: TileOptions) -> Path:
    """Predict one raster tile by tile into its label GeoTIFF (and probabilities GeoTIFF)."""
    from hooktrain.deploy.raster import LABEL_NODATA, bounded_cache

    labels = segmenter.recipe.data.num_labels
    if labels > LABEL_NODATA:
        raise UserError(
            f"predict: {labels} classes do not fit a tiled uint8 label GeoTIFF (0..{LABEL_NODATA - 1}, "
            f"{LABEL_NODATA} = nodata); predict images under {TILE_ABOVE} pixels without --tiled"
        )
    with bounded_cache():
        return _write_tiled(segmenter, path, outputs, tiles)


def _write_tiled(segmenter: Any, path: Path, outputs: tuple[Path, Path], tiles: TileOptions) -> Path:
    from tqdm.auto import tqdm

    from hooktrain.deploy.raster import LABEL_NODATA, GeoTiffWriter, RasterSource

    label_path, probs_path = outputs
    source = RasterSource(path, segmenter.recipe.data.in_channels)
    writers = []
    try:
        probabilities = "uint8" if tiles.probabilities else None
        predictor = segmenter.tiled(source, crop_size=tiles.crop_size, stride=tiles.stride, blend=tiles.blend,
                                    probabilities=probabilities, on_tiles=lambda n: progress.update(n))  # fmt: skip
        progress = tqdm(total=len(predictor.windows), unit="tile", desc=path.name, disable=not tiles.progress)
        masked = source.masked
        writers.append(GeoTiffWriter(label_path, source.profile, 1, nodata=LABEL_NODATA if masked else None,
                                     masked=masked, colours=segmenter.palette))  # fmt: skip
        if tiles.probabilities:
            classes = segmenter.recipe.data.num_labels
            writers.append(GeoTiffWriter(probs_path, source.profile, classes, masked=masked))
        for rows in predictor.rows():
            writers[0].write(rows.labels, rows.valid)
            if tiles.probabilities:
                writers[1].write(rows.probabilities, rows.valid)
        progress.close()
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        source.close()
    logger.info(f"{path}: {len(predictor.windows)} tiles of {tuple(predictor.cfg.crop_size)} "
                f"(stride {tuple(predictor.cfg.stride)}, blend {predictor.cfg.blend}) -> {label_path}")  # fmt: skip
    return label_path


def output_paths(images: list[Path], out_dir: Path, tiled: list[Path] = ()) -> dict[Path, tuple[Path, Path]]:
    """The two files ``predict`` writes for each image: ``(<stem>.png, <stem>_label.png)``, or
    for one predicted in tiles ``(<stem>_label.tif, <stem>_probs.tif)``; the stem prefixed with
    the parent directory's name when two images share it."""
    unique = len(images) == len({p.stem for p in images})
    outputs = {}
    for path in images:
        stem = path.stem if unique else _unique_stem(path)
        if path in tiled:
            outputs[path] = (out_dir / f"{stem}_label.tif", out_dir / f"{stem}_probs.tif")
        else:
            outputs[path] = (out_dir / f"{stem}.png", out_dir / f"{stem}_label.png")
    return outputs


def refuse_overwriting_inputs(images: list[Path], outputs: list[tuple[Path, ...]]) -> None:
    """Raise a ``UserError`` when an output path is one of the input images (as the same file,
    whatever the spelling of the paths)."""
    inputs = {path.resolve() for path in images}
    for image, pair in zip(images, outputs, strict=True):
        for output in pair:
            if output.resolve() in inputs:
                raise UserError(
                    f"predict: the prediction {output.name} of {image} would overwrite the input image {output}; "
                    "give an --out directory that holds no input images"
                )


def _unique_stem(path: Path) -> str:
    return "_".join(path.with_suffix("").parts[-2:])
