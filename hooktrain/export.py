"""Export a checkpoint to one ``.safetensors`` file, and predict masks with it.

An exported file holds the model's weights (plain module keys) and, in the safetensors
metadata, the resolved recipe as YAML (``hooktrain.recipe``) plus the format and the
iteration it came from. ``predict`` needs nothing else: it rebuilds the segmentor from that
recipe, runs the recipe's val pipeline and its ``model.inference`` (whole/slide, flip,
scales) at each image's original size, and writes a colour PNG (the recipe's palette) and a
raw label PNG per image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.errors import UserError

if TYPE_CHECKING:  # torch loads when a model does, so a refused command answers at once
    import torch

FORMAT = "hooktrain-export/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _checkpoint_dir(checkpoint: Path) -> Path:
    from hooktrain.checkpoints import LATEST, WEIGHTS

    if checkpoint.is_file() and checkpoint.name == LATEST:
        checkpoint = checkpoint.parent / checkpoint.read_text().strip()
    if not checkpoint.is_dir():
        raise UserError(
            f"export: checkpoint {checkpoint} not found; give a checkpoint directory such as "
            "work_dirs/run/checkpoints/iter_1000 (or its best/ or latest)"
        )
    if not (checkpoint / WEIGHTS).is_file():
        raise UserError(f"export: {checkpoint} has no {WEIGHTS}; is it a hooktrain checkpoint?")
    return checkpoint


def _recipe_text(checkpoint: Path) -> str:
    # Checkpoints carry their recipe; older ones only have the run's recipe.yaml two levels up.
    for candidate in (checkpoint / "recipe.yaml", checkpoint.parent.parent / "recipe.yaml"):
        if candidate.is_file():
            return candidate.read_text()
    raise UserError(
        f"export: no recipe.yaml in {checkpoint} or its run directory; "
        "export a checkpoint written by `hooktrain train`"
    )


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``checkpoint``'s weights and recipe to the single file ``out`` (atomically)."""
    from safetensors.torch import load_file, save_file

    from hooktrain.checkpoints import WEIGHTS, checkpoint_iteration, give_default_mode, plain_state_dict

    directory = _checkpoint_dir(Path(checkpoint))
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export: output {out} must end with .safetensors")
    weights = plain_state_dict(load_file(str(directory / WEIGHTS)))
    recipe = _recipe_text(directory)
    iteration = checkpoint_iteration(directory)
    best_file = directory / "best.json"
    if iteration is None and best_file.is_file():
        iteration = json.loads(best_file.read_text()).get("iter")
    metadata = {"format": FORMAT, "hooktrain.recipe": recipe, "iter": str(iteration)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    save_file(weights, str(tmp), metadata=metadata)
    give_default_mode(tmp)
    os.replace(tmp, out)
    return out


def load_exported(path: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """The segmentor (eval mode, weights loaded) and the ``Recipe`` of an exported file."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    from hooktrain.models import build_segmentor
    from hooktrain.recipe import validate_recipe

    path = Path(path)
    if not path.is_file():
        raise UserError(f"predict: model file {path} not found; create one with `hooktrain export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise UserError(f"predict: {path} is not a safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT or "hooktrain.recipe" not in metadata:
        raise UserError(
            f"predict: {path} carries no hooktrain recipe; export it with "
            "`hooktrain export CHECKPOINT OUT.safetensors`"
        )
    data = yaml.safe_load(metadata["hooktrain.recipe"])
    data["hooks"] = []  # the training hooks (maybe not installed here) play no part
    data.pop("load_from", None)
    data["model"]["encoder"]["pretrained"] = False  # the exported weights replace them
    data["model"]["encoder"]["pretrained_path"] = None
    recipe = validate_recipe(data)
    model = build_segmentor(
        recipe.model, num_classes=recipe.data.num_classes, ignore_index=recipe.data.ignore_index
    )
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), recipe


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
    model_file: str | os.PathLike, inputs: list[str], out_dir: str | os.PathLike
) -> list[Path]:
    """Segment every image; writes ``<stem>.png`` (colours) and ``<stem>_label.png`` (class
    indices) into ``out_dir``. Returns the colour PNGs' paths. Refuses, before loading the
    model or writing anything, outputs that would overwrite an input image."""
    images = find_images(inputs)
    out_dir = Path(out_dir)
    outputs = output_paths(images, out_dir)
    refuse_overwriting_inputs(images, outputs)
    return _segment(model_file, images, out_dir, outputs)


def _segment(model_file: str | os.PathLike, images: list[Path], out_dir: Path,
             outputs: list[tuple[Path, Path]]) -> list[Path]:  # fmt: skip
    """Write the colour and label PNG of each image to its ``outputs`` pair in ``out_dir``."""
    import cv2
    import numpy as np
    import torch

    from hooktrain.data.labels import decode_image
    from hooktrain.data.transforms import ValTransform
    from hooktrain.models.inference import predict_scales

    model, recipe = load_exported(model_file)
    data = recipe.data
    if data.val is None:
        raise UserError(
            f"predict: the recipe in {model_file} has no data.val section, whose pipeline "
            "predict uses; export a checkpoint of a recipe with data.val"
        )
    if data.num_classes > 256:
        raise UserError(f"predict: {data.num_classes} classes do not fit an 8-bit label PNG")
    transform = ValTransform(data.val.pipeline, mean=data.mean, std=data.std)
    palette = np.asarray(data.colours, dtype=np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, (colour_png, label_png) in zip(images, outputs, strict=True):
        image = decode_image(path.read_bytes(), example_id=str(path))
        if model.inference.scales is None:
            tensor, _ = transform(image, example_id=str(path))
            scores = model.predict(tensor[None], [tuple(tensor.shape[-2:])], [image.shape[:2]])[0]
        else:  # the multi-scale test: the original image resized by each factor, one at a time
            views = (transform.rescaled(image, r, example_id=str(path))[None] for r in model.inference.scales)
            scores = predict_scales(model.logits, views, image.shape[:2], model.inference, model.align_corners)
        label = scores.argmax(0).to(torch.uint8).numpy()
        colour = palette[label]
        cv2.imwrite(str(label_png), label)
        cv2.imwrite(str(colour_png), cv2.cvtColor(colour, cv2.COLOR_RGB2BGR))
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
