"""Export a checkpoint to one file, and load an exported ``.safetensors`` file back.

``hooktrain export`` picks the format from the output's suffix. A ``.safetensors`` file holds
the model's weights (plain module keys) and, in the safetensors metadata, the resolved recipe
as YAML (``hooktrain.recipe``) plus the format and the iteration it came from; ``predict``,
:class:`hooktrain.deploy.segmenter.Segmenter`, ``test --checkpoint`` and ``load_from`` need nothing else. A
``.onnx`` file is the whole-image graph with the recipe in its metadata, verified by
onnxruntime before it is written (:mod:`hooktrain.deploy.onnx_export`). Predicting is
:mod:`hooktrain.deploy.predict`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.checkpoint.dcp import unconsolidated
from hooktrain.checkpoint.layout import BEST_RECORD, LATEST, RECIPE, WEIGHTS
from hooktrain.errors import UserError

if TYPE_CHECKING:  # torch loads when a model does, so a refused command answers at once
    import torch

FORMAT = "hooktrain-export/1"


def _checkpoint_dir(checkpoint: Path) -> Path:
    if checkpoint.is_file() and checkpoint.name == LATEST:
        checkpoint = checkpoint.parent / checkpoint.read_text().strip()
    if not checkpoint.is_dir():
        raise UserError(
            f"export: checkpoint {checkpoint} not found; give a checkpoint directory such as "
            "work_dirs/run/checkpoints/iter_1000 (or its best/ or latest)"
        )
    if problem := unconsolidated(checkpoint):
        raise UserError(f"export: {problem}")
    if not (checkpoint / WEIGHTS).is_file():
        raise UserError(f"export: {checkpoint} has no {WEIGHTS}; is it a hooktrain checkpoint?")
    return checkpoint


def _recipe_text(checkpoint: Path) -> str:
    # Checkpoints carry their recipe; older ones only have the run's recipe.yaml two levels up.
    for candidate in (checkpoint / RECIPE, checkpoint.parent.parent / RECIPE):
        if candidate.is_file():
            return candidate.read_text()
    raise UserError(
        f"export: no recipe.yaml in {checkpoint} or its run directory; "
        "export a checkpoint written by `hooktrain train`"
    )


SUFFIXES = (".safetensors", ".onnx")


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, report: Callable[[str], None] | None = None
) -> Path:
    """Write ``checkpoint``'s model to the single file ``out`` (atomically), in the format its
    suffix names: ``.safetensors`` (weights + recipe, for ``predict``, ``test`` and
    ``load_from``) or ``.onnx`` (the whole-image graph, verified by onnxruntime; see
    :mod:`hooktrain.deploy.onnx_export`). ``report`` gets the ONNX export's summary line."""
    from safetensors.torch import load_file, save_file

    from hooktrain.checkpoint.files import atomic_path
    from hooktrain.checkpoint.state import checkpoint_iteration, plain_state_dict

    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise UserError(
            f"export: output {out} must end with .safetensors (weights + recipe, for predict/test) "
            "or .onnx (an ONNX graph verified by onnxruntime)"
        )
    directory = _checkpoint_dir(Path(checkpoint))
    weights = plain_state_dict(load_file(str(directory / WEIGHTS)))
    recipe = _recipe_text(directory)
    iteration = checkpoint_iteration(directory)
    best_file = directory / BEST_RECORD
    if iteration is None and best_file.is_file():
        iteration = json.loads(best_file.read_text()).get("iter")
    if out.suffix == ".onnx":
        from hooktrain.deploy.onnx_export import export_onnx, onnx_metadata

        resolved = exported_recipe(recipe)
        model = build_exported_model(resolved, weights, inference_only=True)
        metadata = onnx_metadata(resolved, recipe, iteration)
        return export_onnx(model, resolved.data.in_channels, metadata, out, report=report)
    metadata = {"format": FORMAT, "hooktrain.recipe": recipe, "iter": str(iteration)}
    with atomic_path(out, default_mode=True) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return out


def exported_recipe(text: str) -> Any:
    """The ``Recipe`` of an exported model's recipe YAML, made self-contained: no training hooks
    (they may not be installed here), no ``load_from``, no pretrained encoder weights (the
    exported weights replace them)."""
    import yaml

    from hooktrain.recipe.schema import validate_recipe

    data = yaml.safe_load(text)
    data["hooks"] = []
    data.pop("load_from", None)
    data["model"]["encoder"]["pretrained"] = False
    data["model"]["encoder"]["pretrained_path"] = None
    return validate_recipe(data)


def build_exported_model(recipe: Any, weights: dict[str, torch.Tensor], *, inference_only: bool = False):
    """The recipe's segmentor with ``weights`` loaded strictly, in eval mode. ``inference_only``
    builds it without ``compile`` and ``channels_last`` (for tracing and exporting)."""
    from hooktrain.models import build_recipe_segmentor

    model = build_recipe_segmentor(recipe, pretrained=False, inference_only=inference_only)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def load_exported(path: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """The segmentor (eval mode, weights loaded) and the ``Recipe`` of an exported file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

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
    recipe = exported_recipe(metadata["hooktrain.recipe"])
    return build_exported_model(recipe, load_file(str(path))), recipe
