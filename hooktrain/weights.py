"""Loading weights alone (``load_from``, ``hooktrain test --checkpoint``), not a whole run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load a ``.safetensors`` file, or a checkpoint directory's ``model.safetensors``, into
    ``model``. Reports missing and unexpected keys; ``strict`` refuses any."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"weights not found: {file}; give a .safetensors file or a checkpoint directory"
        )
    state = load_file(str(file))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise UserError(
            f"{file} does not fit the recipe's model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    logger.info(
        "loaded weights from %s: %d missing keys %s, %d unexpected keys %s",
        file, len(result.missing_keys), result.missing_keys[:10],
        len(result.unexpected_keys), result.unexpected_keys[:10],
    )  # fmt: skip
