"""Sharded checkpoints (``train.sharded_checkpoint: true`` under FSDP): the model and optimizer
state written with ``torch.distributed.checkpoint`` (DCP), each rank its own shard, so no rank
ever holds the whole state.

Inside such a checkpoint, ``sharded/`` replaces ``model.safetensors`` and ``optimizer.bin``: one
DCP checkpoint of ``{"model": ..., "optimizer": ...}`` as torch's ``get_state_dict`` gives them
(the plain module's parameter names, the optimizer state keyed by them), a
``__<rank>_<n>.distcp`` file per rank and ``.metadata``, which rank 0 writes last.
``train_state.json`` says ``"model_state": "sharded"`` and records each of those files' size,
so :mod:`hooktrain.checkpoint.resume` tells a whole one from a damaged one without torch.
Loading gives each rank its part of every tensor, for any number of processes (one included,
where the model is plain): DCP re-shards. :func:`consolidate` writes the whole, plain
``model.safetensors`` that ``test``, ``export`` and ``load_from`` read
(``hooktrain convert dcp CHECKPOINT``); it is the only step that holds the whole model.

Nothing here imports torch at import time: the resume check runs before torch is loaded.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.checkpoint.layout import SHARDED, TRAIN_STATE, WEIGHTS
from hooktrain.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: ``train_state.json``'s ``model_state`` for a checkpoint whose model and optimizer are in ``sharded/``.
SHARDED_STATE = "sharded"
#: ``train_state.json``'s record of the DCP files and their sizes in bytes.
SHARDED_FILES = "sharded_files"
_METADATA = ".metadata"  # DCP's name, written by rank 0 once every rank has written its shard


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> dict[str, int]:
    """Write this rank's shard of the prepared ``model``'s and ``optimizer``'s state into
    ``directory/sharded`` (every rank calls it: a collective). Returns, on the main process,
    every file of the DCP checkpoint with its size, for ``train_state.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, _plain(optimizer))
    target = directory / SHARDED
    # Tensors every rank holds whole are written once; by default by whichever rank has written
    # least, but BatchNorm statistics differ per rank after each forward, and a checkpoint
    # holds rank 0's (as a gathered one does; every rank gets them before its next forward).
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
    state = {"model": model_state, "optimizer": optimizer_state}
    metadata = dcp.save(state, checkpoint_id=target, planner=planner)
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():  # filled on the coordinator, rank 0
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    if (target / _METADATA).is_file():
        sizes[_METADATA] = (target / _METADATA).stat().st_size
    return dict(sorted(sizes.items()))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load ``directory/sharded`` into the prepared ``model`` and ``optimizer``: each rank reads its
    own part of every tensor, whatever the number of processes that saved it (every rank calls
    it; in one process no process group is needed)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, _plain(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    _load(state, checkpoint_id=directory / SHARDED)
    set_state_dict(model, _plain(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded(checkpoint: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose key starts with ``prefix``, whole, under its key
    without the prefix, read in this process alone (no process group). ``"model."`` gives the
    plain state dict; ``"optimizer.state."`` the optimizer's moments by parameter name."""
    import torch

    reader, entries = _tensor_entries(checkpoint, prefix)
    state = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in entries.items()}
    _load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix(prefix): value for key, value in state.items()}


def sharded_shapes(checkpoint: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each model tensor's shape as the sharded checkpoint's DCP metadata records it (no tensor
    is read)."""
    entries = _tensor_entries(checkpoint, "model.")[1]
    return {key.removeprefix("model."): tuple(entry.size) for key, entry in entries.items()}


def _tensor_entries(checkpoint: str | os.PathLike, prefix: str) -> tuple[Any, dict[str, Any]]:
    """The DCP reader of ``checkpoint``'s shards and its metadata's tensors whose key starts with ``prefix``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(Path(checkpoint) / SHARDED))
    entries = reader.read_metadata().state_dict_metadata.items()
    return reader, {key: entry for key, entry in entries
                    if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}  # fmt: skip


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory holding a sharded model state."""
    return (Path(path) / SHARDED).is_dir()


def unconsolidated(path: str | os.PathLike) -> str | None:
    """For a sharded checkpoint without a whole ``model.safetensors``: the one-line problem and
    the command that writes it; else None."""
    path = Path(path)
    if not is_sharded_checkpoint(path) or (path / WEIGHTS).is_file():
        return None
    return (
        f"{path} is a sharded checkpoint (train.sharded_checkpoint: true) and holds no whole {WEIGHTS}; "
        f"write it with `hooktrain convert dcp {path}`, then give the directory again"
    )


def consolidate(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the whole, plain weights of the sharded ``checkpoint`` to ``out`` (default: the
    checkpoint's own ``model.safetensors``, after which every tool reads the directory as any
    other checkpoint), atomically, in one process. Returns the file written."""
    from safetensors.torch import save_file

    from hooktrain.checkpoint.files import atomic_path

    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise UserError(f"convert dcp: {checkpoint} is not a sharded checkpoint (no {SHARDED}/ in it); "
                        "give an iter_N directory of a run with train.sharded_checkpoint: true")  # fmt: skip
    try:
        state = json.loads((checkpoint / TRAIN_STATE).read_bytes())
    except (OSError, ValueError):
        state = {}
    if problems := sharded_problems(checkpoint, state if isinstance(state, dict) else {}):
        raise UserError(f"convert dcp: {checkpoint} is not a whole checkpoint: {', '.join(problems)}")
    out = Path(out) if out is not None else checkpoint / WEIGHTS
    weights = {key: value.contiguous() for key, value in read_sharded(checkpoint).items()}
    with atomic_path(out, fsync=True, default_mode=True) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    return out


def sharded_problems(path: Path, state: dict[str, Any]) -> list[str]:
    """What is wrong with the DCP files of the checkpoint ``path`` whose ``train_state.json`` is
    ``state``, as short phrases (``[]`` when every file is there at its recorded size)."""
    files = state.get(SHARDED_FILES)
    if not isinstance(files, dict) or _METADATA not in files:
        return [f"{TRAIN_STATE} has no valid {SHARDED_FILES}"]
    problems = []
    for name, expected in files.items():
        try:
            size = (path / SHARDED / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{SHARDED}/{name} is missing")
            continue
        except OSError as exc:
            problems.append(f"{SHARDED}/{name} cannot be read ({exc.strerror})")
            continue
        if size < expected:
            problems.append(f"{SHARDED}/{name} is truncated ({size:,} of {expected:,} bytes)")
        elif size > expected:
            problems.append(f"{SHARDED}/{name} has {size:,} bytes, more than the {expected:,} recorded")
    return problems


def _load(state: dict[str, Any], **options: Any) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a process group is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, **options)


def _plain(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
