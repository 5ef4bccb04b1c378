"""The checks a command runs before it writes or moves anything, without building the model.

``hooktrain.recipe.schema.load_recipe`` has already checked the schema, the hooks' options and their
``check_recipe``, without importing torch. What needs timm or a weights file comes here: the
recipe's model is built on the meta device (no memory, no weights downloaded), which checks
the encoder name against timm's registry, ``in_index`` against the encoder's levels and every
head setting; the weights files named by the recipe or the command are compared with it
through their safetensors headers.
"""

from __future__ import annotations

import os
from pathlib import Path

from hooktrain.checkpoint.dcp import is_sharded_checkpoint, sharded_shapes
from hooktrain.checkpoint.weights import Shapes, compare, read_shapes, refuse_misfit, weights_file
from hooktrain.errors import UserError
from hooktrain.models import build_recipe_segmentor
from hooktrain.models.hub import is_hub_id, resolve_encoder_weights, resolve_weights
from hooktrain.recipe.schema import Recipe

RESUME_FIX = "resume with the recipe the run was trained with, or start a new run with load_from: <that checkpoint>"
TEST_FIX = "test with the recipe the checkpoint was trained with (its recipe.yaml)"


def model_shapes(recipe: Recipe) -> Shapes:
    """Every parameter and buffer shape of the recipe's model, built on the meta device."""
    model = build_recipe_segmentor(recipe, on_meta=True)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_files(recipe: Recipe) -> None:
    """Files the recipe names exist (the encoder's ``pretrained_path``; an ``hf://OWNER/NAME``
    id is downloaded, or found in the cache, so a wrong id fails here in one line)."""
    path = recipe.model.encoder.pretrained_path
    if is_hub_id(path):
        resolve_encoder_weights(path)
    elif path is not None and not Path(path).is_file():
        raise UserError(f"model.encoder.pretrained_path: {path} is not a file; fix the path or set it to null")


def check_weights(
    shapes: Shapes, path: str | os.PathLike, *, strict: bool, fix: str = TEST_FIX
) -> Path:
    """``path``'s tensors fit ``shapes``: exactly when ``strict``, at least partly otherwise
    (``load_from``). Returns the weights file (for ``hf://OWNER/NAME``, the downloaded one). A
    sharded checkpoint's shapes (``--resume``) come from its DCP metadata."""
    if strict and is_sharded_checkpoint(path):
        refuse_misfit(Path(path), compare(sharded_shapes(path), shapes), strict=True, fix=fix)
        return Path(path)
    file = weights_file(resolve_weights(path))
    refuse_misfit(file, compare(read_shapes(file), shapes), strict=strict, fix=fix)
    return file


def preflight(recipe: Recipe, *, checkpoint: str | os.PathLike | None = None, fix: str = TEST_FIX) -> Shapes:
    """Everything about ``recipe`` (and the ``checkpoint`` whose weights it must take exactly)
    that can be checked without data or a real model. Returns the model's shapes."""
    check_files(recipe)
    if recipe.model.encoder.name.startswith("hf-hub:"):
        return {}  # the architecture itself lives on the Hub: found when the model is built
    shapes = model_shapes(recipe)
    if checkpoint is not None:
        check_weights(shapes, checkpoint, strict=True, fix=fix)
    elif recipe.load_from is not None:
        check_weights(shapes, recipe.load_from, strict=False)
    return shapes
