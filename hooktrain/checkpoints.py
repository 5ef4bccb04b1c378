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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hooktrain.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from hooktrain.runner import IterRunner

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
OLD_PREFIX = ".old-"
BEST = "best"
WEIGHTS = "model.safetensors"
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


def read_latest(work_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint the ``latest`` pointer names, or None if it names none."""
    root = Path(work_dir) / CHECKPOINTS
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    path = root / name
    return path if _NAME.match(name) and (path / "train_state.json").is_file() else None


def resolve_resume(work_dir: str | os.PathLike, resume: str | None) -> Path:
    """The checkpoint ``--resume`` means: with ``"auto"``, the one ``latest`` names (the last
    one this work dir saved, even after resuming from an older one), else the newest complete
    one; otherwise the given directory (or a ``latest`` file naming one)."""
    if resume == "auto":
        latest = read_latest(work_dir)
        found = [p for p in complete_checkpoints(work_dir) if (p / "train_state.json").is_file()]
        if latest is None and not found:
            raise UserError(
                f"--resume: no complete checkpoint in {Path(work_dir) / CHECKPOINTS}; "
                "start without --resume, or pass --resume PATH"
            )
        return latest or found[-1]
    path = Path(resume)
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise UserError(
            f"--resume {resume}: not a complete hooktrain checkpoint (no train_state.json); "
            f"pick a directory like {Path(work_dir) / CHECKPOINTS / 'iter_1000'}"
        )
    return path


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
    _fsync_dir(dest.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directory entries) to disk before a rename."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:  # another rank's temporary file, renamed meanwhile
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# -- saving -----------------------------------------------------------------------------


def save_checkpoint(runner: IterRunner) -> Path:
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
    runner.save_state(tmp)
    if accelerator.is_main_process:
        (tmp / "recipe.yaml").write_text(_recipe_text(runner))
    fsync_tree(tmp)  # each rank flushes what it wrote (the work dir may be shared by nodes)
    accelerator.wait_for_everyone()
    final = root / name
    if accelerator.is_main_process:
        fsync_tree(tmp)
        replace_dir(tmp, final)
        write_text_atomically(root / LATEST, name + "\n")
    accelerator.wait_for_everyone()  # no rank goes on (or exits) before the rename
    return final


def prune_checkpoints(work_dir: Path, max_keep: int, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints so at most ``max_keep`` remain, never ``keep``
    (the one just saved) and never ``best``. Main process only. Returns what was removed."""
    others = [p for p in complete_checkpoints(work_dir) if p != keep]
    removed = others[: max(0, len(others) + 1 - max_keep)]
    for path in removed:
        remove_checkpoint(path)
    return removed


def save_best(runner: IterRunner, best: dict[str, Any]) -> Path:
    """Write the model's weights, ``best`` and the recipe to ``checkpoints/best`` atomically
    (main process only)."""
    from safetensors.torch import save_file

    root = runner.work_dir / CHECKPOINTS
    tmp = root / (TMP_PREFIX + BEST)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = runner.unwrapped_model.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
    (tmp / "best.json").write_text(json.dumps(best, indent=1))
    (tmp / "recipe.yaml").write_text(_recipe_text(runner))
    fsync_tree(tmp)
    final = root / BEST
    replace_dir(tmp, final)
    return final


def _recipe_text(runner: IterRunner) -> str:
    from hooktrain.recipe import dump_recipe

    return dump_recipe(runner.recipe)

