"""``hooktrain convert mmseg|transformers|smp``: another framework's checkpoint -> one exported file.

The output is what ``hooktrain export`` writes (weights under plain module keys, the resolved
recipe in the metadata), so ``predict``, ``test --checkpoint``, ``load_from`` and
:func:`hooktrain.deploy.export.load_exported` all take it. Conversion is strict: every source tensor
must be used and every tensor of the recipe's model filled, with the same shape.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from hooktrain.checkpoint.files import atomic_path
from hooktrain.errors import UserError
from hooktrain.models.backbone_keys import StateDict, to_encoder_keys
from hooktrain.models.hub import WEIGHT_FILES, HubUnavailable, download_weights
from hooktrain.models.segmentor_keys import UnknownKeys, from_mmseg, from_smp, from_transformers

SHOWN = 5  # offending keys named in an error


def load_torch_file(path: Path, what: str) -> dict:
    """A ``.pth``/``.bin`` file loaded as data only (``weights_only``), numpy scalars allowed,
    which older zoo checkpoints keep in their ``meta``; or a ``.safetensors`` file."""
    if not path.is_file():
        raise UserError(f"{what}: no such file '{path}'; give the checkpoint's path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(_numpy_data_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{what}: could not read '{path}' as a weights-only torch checkpoint ({first}); "
            "give the checkpoint as published (state_dict + meta), or re-save its state_dict"
        ) from None


def _numpy_data_types() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type)]
    return [np.dtype, core.multiarray.scalar, *dtypes]


def transformers_weights(source: str) -> StateDict:
    """The state dict of a transformers model: a local directory or weights file, or a Hub
    repository id downloaded through huggingface_hub (``model.safetensors`` or the torch file)."""
    path = Path(source)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return load_torch_file(path / name, "convert transformers")
        raise UserError(f"convert transformers: {path} has no model.safetensors or pytorch_model.bin")
    if path.is_file():
        return load_torch_file(path, "convert transformers")
    try:
        file = download_weights(source)
    except HubUnavailable as err:
        raise UserError(
            f"convert transformers: '{source}' is neither a local path nor a downloadable Hub model ({err}); "
            "give a directory with model.safetensors or a Hub id such as nvidia/segformer-b0-finetuned-ade-512-512"
        ) from None
    return load_torch_file(file, "convert transformers")


def smp_weights(source: str) -> StateDict:
    """The state dict of a segmentation_models_pytorch model: ``model.state_dict()`` saved with
    ``torch.save`` or safetensors, a checkpoint holding it under ``state_dict`` (PyTorch
    Lightning, with its ``model.`` prefix), or a ``save_pretrained`` directory."""
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise UserError(f"convert smp: {path} has no model.safetensors or pytorch_model.bin")
        path = found[0]
    state = load_torch_file(path, "convert smp")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def fit_to_model(converted: StateDict, model: torch.nn.Module, source: str) -> StateDict:
    """``converted`` under ``model``'s exact keys; one ``UserError`` line naming the first
    offenders unless it fills every tensor of the model with one of the same shape and
    every converted tensor is used."""
    expected = model.state_dict()
    encoder = {k.removeprefix("encoder."): v for k, v in converted.items() if k.startswith("encoder.")}
    encoder_keys = {k.removeprefix("encoder.") for k in expected if k.startswith("encoder.")}
    state = {k: v for k, v in converted.items() if not k.startswith("encoder.")}
    state.update({f"encoder.{k}": v for k, v in to_encoder_keys(encoder, encoder_keys).items()})
    missing = sorted(expected.keys() - state.keys())
    unused = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} {list(state[k].shape)} vs the model's {list(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(found)} {label} ({', '.join(found[:SHOWN])})"
        for found, label in (
            (missing, "model tensors not filled"),
            (unused, "source tensors unused"),
            (wrong, "shape mismatches"),
        )
        if found
    ]
    if problems:
        raise UserError(
            f"convert: {source} does not fit the recipe's model: {'; '.join(problems)}; "
            "pick the recipe of the checkpoint's architecture (model, num_classes, aux head)"
        )
    return {k: state[k].to(expected[k].dtype).contiguous() for k in expected}


def convert(
    kind: str,
    source: str,
    recipe_path: str | None,
    out: str | os.PathLike,
    cfg_options: list[str] | None = None,
) -> Path:
    """Convert ``source`` (``kind`` is ``mmseg``, ``transformers`` or ``smp``) into the model of the recipe
    at ``recipe_path`` and write it, with the resolved recipe, to the ``.safetensors`` file ``out``.

    A transformers checkpoint with a ``config.json`` (EoMT, Mask2Former, SegFormer, UperNet) needs no recipe
    (``recipe_path`` None): :mod:`hooktrain.deploy.transformers_recipe` derives it; a given recipe
    must agree with the config (one ``UserError`` line names the first setting that does not)."""
    from safetensors.torch import save_file

    from hooktrain.deploy.export import FORMAT
    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import dump_recipe

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"convert: output {out} must end with .safetensors")
    config = None
    if kind == "transformers":
        config, recipe = _transformers_recipe(source, recipe_path, cfg_options)
    elif recipe_path is None:
        raise UserError(f"convert {kind}: give --recipe, the recipe of the checkpoint's architecture")
    else:
        recipe = _load_recipe(recipe_path, cfg_options)
    converted = _converted_weights(kind, source, config)
    model = build_recipe_segmentor(recipe, on_meta=True)
    if config is not None:
        from hooktrain.deploy.transformers_recipe import check_recipe_matches

        check_recipe_matches(config, recipe, model, recipe_path)
    weights = fit_to_model(converted, model, source)
    metadata = {
        "format": FORMAT,
        "hooktrain.recipe": dump_recipe(recipe),
        "iter": "None",
        "converted_from": f"{kind}:{Path(source).name}",
    }
    with atomic_path(out, default_mode=True) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return out


def _load_recipe(recipe_path: str, cfg_options: list[str] | None):
    from hooktrain.recipe.schema import load_recipe

    return load_recipe(recipe_path, cfg_options)


def _transformers_recipe(source: str, recipe_path: str | None, cfg_options: list[str] | None) -> tuple:
    """The checkpoint's ``config.json`` (None without one) and the recipe: ``recipe_path``'s, or
    the one derived from the config."""
    from hooktrain.deploy.transformers_recipe import check_model_type, recipe_from_transformers, transformers_config
    from hooktrain.recipe.schema import apply_cfg_options, validate_recipe

    config, preprocessor = transformers_config(source)
    if config is not None:
        check_model_type(config, source)
    if recipe_path is not None:
        return config, _load_recipe(recipe_path, cfg_options)
    if config is None:
        raise UserError(
            f"convert transformers: {source} has no config.json to derive the recipe from; "
            "give --recipe, or the checkpoint's directory or Hub id"
        )
    data = apply_cfg_options(recipe_from_transformers(config, preprocessor, source), cfg_options or [])
    return config, validate_recipe(data)


def _converted_weights(kind: str, source: str, config: dict | None) -> StateDict:
    """``source``'s state dict under hooktrain's names."""
    from hooktrain.deploy.transformers_recipe import EOMT_TYPES

    if kind == "mmseg":
        raw, rename = load_torch_file(Path(source), "convert mmseg"), from_mmseg
    elif kind == "smp":
        raw, rename = smp_weights(source), from_smp
    elif config is not None and config.get("model_type") in EOMT_TYPES:
        return _eomt_weights(transformers_weights(source), config, source)
    elif config is not None and config.get("model_type") == "mask2former":
        from hooktrain.models.mask2former_keys import mask2former_keys_from_transformers

        raw, rename = transformers_weights(source), mask2former_keys_from_transformers
    else:
        raw, rename = transformers_weights(source), from_transformers
    try:
        return rename(raw)
    except UnknownKeys as err:
        raise UserError(
            f"convert {kind}: {source} has {len(err.keys)} keys hooktrain has no counterpart for "
            f"({', '.join(err.keys[:SHOWN])}); {err.hint or f'is it a {kind} segmentor checkpoint?'}"
        ) from None


def _eomt_weights(raw: StateDict, config: dict, source: str) -> StateDict:
    from hooktrain.models.eomt_keys import eomt_keys_from_transformers

    try:
        return eomt_keys_from_transformers(raw, config)
    except ValueError as err:
        raise UserError(f"convert transformers: {source}: {err}; is it the checkpoint of its config.json?") from None
