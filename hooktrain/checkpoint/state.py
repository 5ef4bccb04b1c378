"""Checkpoint layout on disk, shared by the runner (resume) and the checkpoint hook (saving).

    <work_dir>/checkpoints/
        iter_2000/            complete checkpoints only: written as .tmp-iter_2000, renamed
        iter_4000/            into place when every rank has finished writing
        best/                 weights of the best validation score (see the checkpoint hook)
        latest                text file naming the newest complete checkpoint ("iter_4000")
        .tmp-iter_6000/       a save in progress, or left by a killed one: never resumed from
        .trash-iter_2000/     a pruned checkpoint being deleted (removed by ``clean_stale``)
        .old-best/            the previous ``best`` while the new one is renamed into place
                              (put back by ``clean_stale`` if a kill left no ``best``)

Inside a checkpoint: Accelerate's ``save_state`` files (``model.safetensors``,
``optimizer.bin``, ``scaler.pt``, ``random_states_<rank>.pkl``, ``custom_checkpoint_0.pkl``
for the LR scheduler), plus ``train_state.json`` (the runner's ``TrainState``),
``hooks.pt`` (every stateful hook), ``data_state_rank<r>.pt`` (each rank's stream
position) and ``recipe.yaml`` (the resolved recipe, for ``hooktrain export``).
``model.safetensors`` holds the plain module's keys (no DDP ``module.`` prefix), so the
weights load at any world size, into ``load_from`` and into ``hooktrain export``.

With ``train.sharded_checkpoint`` under FSDP, ``sharded/`` (each rank's shard, written with
``torch.distributed.checkpoint``: :mod:`hooktrain.checkpoint.dcp`) takes the place of
``model.safetensors`` and ``optimizer.bin``.

``best/`` holds ``model.safetensors``, ``best.json`` (``{"key", "value", "iter"}``) and
``recipe.yaml``.

Saving (``save_checkpoint``): every rank writes into ``.tmp-iter_<N>`` and flushes it to
disk; after a barrier the main process renames it to ``iter_<N>`` and updates ``latest``; a
final barrier lets no rank leave before the checkpoint is complete. Pruning
(``prune_checkpoints``) renames a checkpoint aside before deleting it. A kill at any moment
therefore leaves only complete ``iter_*`` checkpoints under their names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hooktrain.checkpoint.dcp import SHARDED_FILES, SHARDED_STATE, load_sharded, save_sharded
from hooktrain.checkpoint.files import TMP_PREFIX, fsync_path, give_default_mode, write_atomically
from hooktrain.checkpoint.layout import (  # the layout's names, importable from here too
    BEST,
    BEST_RECORD,
    CHECKPOINTS,
    HOOKS,
    LATEST,
    OPTIMIZER,
    RECIPE,
    SCHEDULER,
    TRAIN_STATE,
    WEIGHTS,
    data_state_file,
    random_states_file,
)
from hooktrain.checkpoint.sharded import (
    BY_NAME,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state,
    load_full_state_dict,
    optimizer_state_by_name,
    without_model_and_optimizer,
)
from hooktrain.errors import DiskFull, disk_full, mount_point
from hooktrain.hooks import Runner
from hooktrain.recipe.schema import dump_recipe

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

TRASH_PREFIX = ".trash-"
OLD_PREFIX = ".old-"
_NAME = re.compile(r"^iter_(\d+)$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration}"


def complete_checkpoints(work_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(work_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration in a checkpoint's name (``iter_2000`` -> 2000), else None."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def clean_stale(work_dir: str | os.PathLike) -> list[str]:
    """Remove what killed saves or prunes left behind; returns the names removed.

    A directory being replaced (``.old-NAME``) whose successor never arrived is put back.
    """
    root = Path(work_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    for path in root.iterdir():
        if path.name.startswith(OLD_PREFIX):
            target = root / path.name.removeprefix(OLD_PREFIX)
            if not target.exists():
                os.rename(path, target)
    stale = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX, OLD_PREFIX))]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in stale]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half one under its name."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the complete directory ``tmp`` to ``dest``, replacing an existing ``dest``.

    The old ``dest`` is renamed aside first and deleted only once the new one is in place,
    so a kill in between leaves a directory ``clean_stale`` puts back.
    """
    old = dest.with_name(OLD_PREFIX + dest.name)
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_path(dest.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directory entries) to disk before a rename."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fsync_path(os.path.join(root, name))
            except FileNotFoundError:  # another rank's temporary file, renamed meanwhile
                continue
        fsync_path(root)


# -- weights without wrappers -----------------------------------------------------------


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as the plain module names them: DDP's ``module.`` prefix removed."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_plain_weights(accelerator: Accelerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` use the unwrapped model's keys.

    Under DDP Accelerate saves the wrapped model's state dict (every key starts with
    ``module.``), which neither a plain model (``load_from``, export) nor a resume with one
    process could load. Saving strips the prefix; loading goes into the unwrapped model.
    """

    def on_save(models: list, weights: list, output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = plain_state_dict(state)

    def on_load(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            models[i] = accelerator.unwrap_model(model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


# -- what a checkpoint holds ------------------------------------------------------------

def expected_files(world_size: int, *, sharded: bool = False) -> list[str]:
    """The files of a complete checkpoint written by ``world_size`` processes, besides
    ``train_state.json`` (``scaler.pt`` is there only with fp16) and, when ``sharded``, the
    files of ``sharded/`` that ``train_state.json`` lists in place of the weights and optimizer."""
    per_rank = [name for rank in range(world_size)
                for name in (random_states_file(rank), data_state_file(rank))]  # fmt: skip
    whole = [] if sharded else [WEIGHTS, OPTIMIZER]
    return [*whole, SCHEDULER, HOOKS, RECIPE, *per_rank]


def save_state(runner: Runner, directory: Path) -> None:
    """Write everything a resume needs into ``directory`` (every rank calls it; see the
    module doc for the files): Accelerate's state and the runner's ``state_dict()``. Under FSDP
    the model and optimizer are gathered whole (:mod:`hooktrain.checkpoint.sharded`), or with
    ``train.sharded_checkpoint`` each rank writes its shard (:mod:`hooktrain.checkpoint.dcp`)."""
    import torch

    accelerator = runner.accelerator
    sharded = is_sharded(accelerator)
    in_shards = sharded and runner.recipe.train.sharded_checkpoint
    with without_model_and_optimizer(accelerator) if sharded else nullcontext():
        accelerator.save_state(str(directory))
    if in_shards:
        shard_files = save_sharded(runner.model, runner.optimizer, directory)
    elif sharded:
        weights = full_state_dict(runner.model)
        optimizer = full_optimizer_state(runner.model, runner.optimizer)
    state = runner.state_dict()
    torch.save(state["data"], directory / data_state_file(accelerator.process_index))
    if accelerator.is_main_process:
        if sharded and not in_shards:
            from safetensors.torch import save_file

            save_file(weights, str(directory / WEIGHTS), metadata={"format": "pt"})
            torch.save(optimizer, directory / OPTIMIZER)
        if not in_shards:
            give_default_mode(directory / WEIGHTS)
        torch.save(state["hooks"], directory / HOOKS)
        progress = {**state["progress"], "world_size": accelerator.num_processes}
        if in_shards:
            progress.update({"model_state": SHARDED_STATE, SHARDED_FILES: shard_files})
        elif sharded:
            progress["optimizer_state"] = BY_NAME
        (directory / TRAIN_STATE).write_text(json.dumps(progress, indent=1))
        (directory / RECIPE).write_text(_recipe_text(runner))


def load_state(runner: Runner, directory: Path) -> str:
    """Restore what ``save_state`` wrote: Accelerate's state (weights, optimizer, scheduler,
    RNGs), then the runner's (``runner.load_state_dict``: progress, hook states and every
    saving rank's stream position). Returns how the stream resumed: ``"exact"``, or
    ``"elastic"`` when the number of processes or workers changed (the pass goes on without
    repeating or skipping an example, in another order). Under FSDP, or from a checkpoint FSDP
    wrote, the whole model and optimizer state are loaded and re-sharded for this run; from a
    sharded checkpoint, each rank reads its own part (:func:`hooktrain.checkpoint.dcp.load_sharded`)."""
    import torch

    accelerator = runner.accelerator
    progress = json.loads((directory / TRAIN_STATE).read_text())
    by_name = progress.pop("optimizer_state", None) == BY_NAME
    in_shards = progress.pop("model_state", None) == SHARDED_STATE
    progress.pop(SHARDED_FILES, None)
    whole = by_name or in_shards or is_sharded(accelerator)
    with without_model_and_optimizer(accelerator) if whole else nullcontext():
        accelerator.load_state(str(directory))
    if in_shards:
        load_sharded(runner.model, runner.optimizer, directory)
    elif whole:
        from safetensors.torch import load_file

        load_full_state_dict(runner.model, load_file(str(directory / WEIGHTS)))
        optimizer = torch.load(directory / OPTIMIZER, weights_only=True)
        if not by_name:  # a DDP checkpoint resumed under FSDP
            optimizer = optimizer_state_by_name(optimizer, runner.optimizer, runner.model)
        load_full_optimizer_state(runner.model, runner.optimizer, optimizer)
    saved_world = progress.pop("world_size", 1)
    data = [torch.load(directory / data_state_file(rank), weights_only=True) for rank in range(saved_world)]
    hooks = torch.load(directory / HOOKS, weights_only=True)
    return runner.load_state_dict({"progress": progress, "hooks": hooks, "data": data})


# -- saving -----------------------------------------------------------------------------


def save_checkpoint(runner: Runner) -> Path:
    """Save ``runner``'s full state as ``checkpoints/iter_<N>`` atomically (call on every
    rank at the same point). Returns the checkpoint's path."""
    accelerator = runner.accelerator
    root = runner.work_dir / CHECKPOINTS
    name = checkpoint_name(runner.state.iter)
    tmp = root / (TMP_PREFIX + name)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save killed at this same iteration
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    check_room(accelerator, root, name)
    try:
        save_state(runner, tmp)
        fsync_tree(tmp)  # each rank flushes what it wrote (the work dir may be shared by nodes)
    except Exception as exc:
        full = disk_full(exc, root / name, what="checkpoint")  # while the partial files fill the disk
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial stays, and its space is free again
        raise full or exc
    accelerator.wait_for_everyone()
    final = root / name
    if accelerator.is_main_process:
        fsync_tree(tmp)
        replace_dir(tmp, final)
        write_atomically(root / LATEST, name + "\n", fsync=True)
    accelerator.wait_for_everyone()  # no rank goes on (or exits) before the rename
    return final


def check_room(accelerator: Accelerator, root: Path, name: str) -> None:
    """Refuse a save the disk has no room for, before writing anything: the newest complete
    checkpoint's size (a new one is as big) against the space free where ``root`` is. Every
    rank gets the main process's answer, so they stop together."""
    from accelerate.utils import broadcast_object_list

    problem = [None]
    if accelerator.is_main_process and (previous := complete_checkpoints(root.parent)):
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
        free = shutil.disk_usage(root).free
        if free < needed:
            problem[0] = (
                f"no space left on {mount_point(root)} for checkpoint {name}: it needs about "
                f"{needed / 2**20:.0f} MiB (the size of {previous[-1].name}) and {free / 2**20:.0f} MiB are free; "
                "nothing was written and the earlier checkpoints are whole; free some space, then "
                "--resume continues from the last checkpoint"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise DiskFull(problem[0])


def prune_checkpoints(work_dir: Path, max_keep: int, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints so at most ``max_keep`` remain, never ``keep``
    (the one just saved) and never ``best``. Main process only. Returns what was removed."""
    others = [p for p in complete_checkpoints(work_dir) if p != keep]
    removed = others[: max(0, len(others) + 1 - max_keep)]
    for path in removed:
        remove_checkpoint(path)
    return removed


def save_best(runner: Runner, best: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write the model's weights ``state`` (``runner.full_state_dict()``), ``best`` and the
    recipe to ``checkpoints/best`` atomically (main process only)."""
    from safetensors.torch import save_file

    root = runner.work_dir / CHECKPOINTS
    tmp = root / (TMP_PREFIX + BEST)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        give_default_mode(tmp / WEIGHTS)
        (tmp / BEST_RECORD).write_text(json.dumps(best, indent=1))
        (tmp / RECIPE).write_text(_recipe_text(runner))
        fsync_tree(tmp)
    except Exception as exc:
        full = disk_full(exc, root / BEST, what="the best checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)
        raise full or exc
    final = root / BEST
    replace_dir(tmp, final)
    return final


def _recipe_text(runner: Runner) -> str:
    return dump_recipe(runner.recipe)

