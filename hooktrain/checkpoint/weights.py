"""Weights alone (``load_from``, ``hooktrain test --checkpoint``, the model of ``--resume``):
finding the file, comparing its tensors with a model's by name and shape, and loading it.

Comparing needs only the file's safetensors header and the model's shapes, so a file that
does not fit is refused before any model is built (see :mod:`hooktrain.engine.preflight`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hooktrain.checkpoint.dcp import unconsolidated
from hooktrain.checkpoint.layout import BEST_RECORD, TRAIN_STATE, WEIGHTS
from hooktrain.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("hooktrain")

Shapes = dict[str, tuple[int, ...]]


def weights_file(path: str | os.PathLike) -> Path:
    """The ``.safetensors`` file ``path`` names: itself, or a checkpoint directory's
    ``model.safetensors``. A sharded checkpoint without one is refused, naming the command that
    writes it (``hooktrain convert dcp``)."""
    path = Path(path)
    if problem := unconsolidated(path):
        raise UserError(problem)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"weights not found: {file}; give a .safetensors file or a checkpoint directory")
    return file


def read_shapes(file: Path) -> Shapes:
    """Each tensor's shape from the file's safetensors header (no tensor is read); DDP's
    ``module.`` prefix removed."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {key.removeprefix("module."): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for a bad header
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"{file} is not a safetensors file ({reason}); give a .safetensors file written by hooktrain "
            "(a checkpoint's model.safetensors, `hooktrain export`, `hooktrain convert`) or a checkpoint directory"
        ) from None


@dataclass
class Fit:
    """How a weights file's tensors fit a model's, by name and shape."""

    fitting: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, file, model
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model

    @property
    def exact(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def skipped(self) -> str:
        """What a non-strict load leaves out, by module: ``kept the model's own
        decode_head.conv_seg.* (other shape in the file)``."""
        kept = []
        if self.mismatched:
            kept.append(f"{module_patterns([key for key, _, _ in self.mismatched])} (other shape in the file)")
        if self.missing:
            kept.append(f"{module_patterns(self.missing)} (not in the file)")
        parts = [f"kept the model's own {'; '.join(kept)}"] if kept else []
        if self.unexpected:
            parts.append(f"ignored {module_patterns(self.unexpected)} (not in the model)")
        return "; ".join(parts)

    def problems(self, limit: int = 3) -> str:
        """The differences, first keys of each kind with both shapes, as one phrase."""
        parts = []
        if self.mismatched:
            shown = "; ".join(
                f"{key}: file {list(file)}, model {list(model)}" for key, file, model in self.mismatched[:limit]
            )
            parts.append(f"{len(self.mismatched)} shape mismatch(es) ({shown})")
        if self.missing:
            parts.append(f"{len(self.missing)} model tensor(s) not in the file ({', '.join(self.missing[:limit])})")
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} file tensor(s) not in the model ({', '.join(self.unexpected[:limit])})"
            )
        return ", ".join(parts)


def compare(found: Shapes, expected: Shapes) -> Fit:
    """Match a file's tensor shapes (``found``) against a model's (``expected``)."""
    fit = Fit()
    for key, shape in expected.items():
        if key not in found:
            fit.missing.append(key)
        elif tuple(found[key]) != tuple(shape):
            fit.mismatched.append((key, tuple(found[key]), tuple(shape)))
        else:
            fit.fitting.append(key)
    fit.unexpected = [key for key in found if key not in expected]
    return fit


def module_patterns(keys: list[str]) -> str:
    """Keys grouped by the module holding them: ``decode_head.conv_seg.*, aux_head.conv_seg.*``."""
    groups = dict.fromkeys(key.rsplit(".", 1)[0] + ".*" if "." in key else key for key in keys)
    return ", ".join(groups)


def state_shapes(model: torch.nn.Module) -> Shapes:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> Fit:
    """Load a ``.safetensors`` file, or a checkpoint directory's ``model.safetensors``, into
    ``model``.

    ``strict`` refuses any difference in names or shapes. Otherwise (``load_from``, as
    MMSegmentation's non-strict loading) every tensor whose name and shape fit is loaded, the
    rest is skipped and listed in one log line, e.g. ``decode_head.conv_seg.*`` when the class
    count changed; a file of which nothing fits is refused.
    """
    from safetensors.torch import load_file

    file = weights_file(path)
    fit = compare(read_shapes(file), state_shapes(model))
    refuse_misfit(file, fit, strict=strict)
    state = {key.removeprefix("module."): value for key, value in load_file(str(file)).items()}
    model.load_state_dict({key: state[key] for key in fit.fitting}, strict=False)
    if fit.exact:
        logger.info("loaded weights from %s (%d tensors)", file, len(fit.fitting))
        return fit
    logger.info("loaded %d of %d model tensors from %s; %s", len(fit.fitting),
                len(fit.fitting) + len(fit.mismatched) + len(fit.missing), file, fit.skipped())  # fmt: skip
    return fit


_STRICT_FIX = "use the recipe the weights were trained with, or fine-tune from them with load_from"


def refuse_misfit(file: Path, fit: Fit, *, strict: bool, fix: str = _STRICT_FIX) -> None:
    """Raise a one-line ``UserError`` when ``fit`` is not good enough: any difference when
    ``strict``, else no fitting tensor at all."""
    if strict and not fit.exact:
        raise UserError(f"{file} does not fit the recipe's model: {fit.problems()}; {fix}")
    if not strict and not fit.fitting:
        raise UserError(
            f"load_from: none of the tensors of {file} fits the recipe's model: {fit.problems()}; "
            "is it a checkpoint of this model? MMSegmentation and transformers checkpoints need "
            "`hooktrain convert` first"
        )


def recorded_iteration(path: str | os.PathLike) -> int | None:
    """The training iteration the weights at ``path`` come from, as the checkpoint directory
    (``train_state.json``, ``best.json``) or the exported file's metadata records it."""
    import json

    from safetensors import safe_open

    file = weights_file(path)
    for name in (TRAIN_STATE, BEST_RECORD):
        record = file.parent / name
        if file.name == WEIGHTS and record.is_file():
            return json.loads(record.read_text()).get("iter")
    with safe_open(str(file), framework="numpy") as f:
        iteration = (f.metadata() or {}).get("iter", "")
    return int(iteration) if iteration.isdigit() else None
