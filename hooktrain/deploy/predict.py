"""``hooktrain predict``: segment image files with an exported model, write PNGs.

Every image goes through :class:`hooktrain.deploy.segmenter.Segmenter` (the recipe's val pipeline, its
``model.inference``, :func:`hooktrain.models.inference.predicted_labels`), from a
``.safetensors`` export (PyTorch) or a ``.onnx`` one (onnxruntime). Per image ``<stem>.png``
(colours of the recipe's palette) and ``<stem>_label.png`` (8-bit class indices).
"""

from __future__ import annotations

import os
from pathlib import Path

from hooktrain.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".npy"}


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


def predict_images(model_file: str | os.PathLike, inputs: list[str], out_dir: str | os.PathLike) -> list[Path]:
    """Segment every image with a ``.safetensors`` or ``.onnx`` export; writes ``<stem>.png``
    (colours) and ``<stem>_label.png`` (class indices) into ``out_dir``. Returns the colour
    PNGs' paths. Refuses, before loading the model or writing anything, outputs that would
    overwrite an input image."""
    images = find_images(inputs)
    out_dir = Path(out_dir)
    outputs = output_paths(images, out_dir)
    refuse_overwriting_inputs(images, outputs)
    return _segment(model_file, images, out_dir, outputs)


def _segment(model_file: str | os.PathLike, images: list[Path], out_dir: Path,
             outputs: list[tuple[Path, Path]]) -> list[Path]:  # fmt: skip
    """Write the colour and label PNG of each image to its ``outputs`` pair in ``out_dir``."""
    import cv2

    from hooktrain.deploy.segmenter import Segmenter

    segmenter = Segmenter.load(model_file)
    labels = segmenter.recipe.data.num_labels
    if labels > 256:
        raise UserError(f"predict: {labels} classes do not fit an 8-bit label PNG")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, (colour_png, label_png) in zip(images, outputs, strict=True):
        label = segmenter(path)
        cv2.imwrite(str(label_png), label)
        cv2.imwrite(str(colour_png), cv2.cvtColor(segmenter.colourize(label), cv2.COLOR_RGB2BGR))
        written.append(colour_png)
    return written


def output_paths(images: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """``(colour PNG, label PNG)`` that ``predict`` writes for each image: ``<stem>.png`` and
    ``<stem>_label.png``, the stem prefixed with the parent directory's name when two images
    share it."""
    unique = len(images) == len({p.stem for p in images})
    stems = [p.stem if unique else _unique_stem(p) for p in images]
    return [(out_dir / f"{stem}.png", out_dir / f"{stem}_label.png") for stem in stems]


def refuse_overwriting_inputs(images: list[Path], outputs: list[tuple[Path, Path]]) -> None:
    """Raise a ``UserError`` when an output path is one of the input images (as the same file,
    whatever the spelling of the paths)."""
    inputs = {path.resolve() for path in images}
    for image, pair in zip(images, outputs, strict=True):
        for kind, output in zip(("colour", "label"), pair, strict=True):
            if output.resolve() in inputs:
                raise UserError(
                    f"predict: the {kind} mask of {image} would overwrite the input image {output}; "
                    "give an --out directory that holds no input images"
                )


def _unique_stem(path: Path) -> str:
    return "_".join(path.with_suffix("").parts[-2:])
