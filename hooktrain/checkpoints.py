"""Checkpoint layout on disk, shared by the runner (resume) and the checkpoint hook (saving).

    <work_dir>/checkpoints/
        iter_2000/            complete checkpoints only: written as .tmp-iter_2000, renamed
        iter_4000/            into place when every rank has finished writing
        best/                 weights of the best validation score (see the checkpoint hook)
        latest                text file naming the newest complete checkpoint ("iter_4000")
        .tmp-iter_6000/       a save in progress, or left by a killed one: never resumed from

Inside a checkpoint: Accelerate's ``save_state`` files (``model.safetensors``,
``optimizer.bin``, ``scaler.pt``, ``random_states_<rank>.pkl``, ``custom_checkpoint_0.pkl``
for the LR scheduler), plus ``train_state.json`` (the runner's ``TrainState``),
``hooks.pt`` (every stateful hook) and ``data_state_rank<r>.pt`` (each rank's stream
position).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from hooktrain.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
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


def resolve_resume(work_dir: str | os.PathLike, resume: str | None) -> Path:
    """The checkpoint ``--resume`` means: the newest complete one in ``work_dir`` when
    ``resume`` is ``"auto"``, else the given directory (or a ``latest`` file naming one)."""
    if resume == "auto":
        found = complete_checkpoints(work_dir)
        if not found:
            raise UserError(
                f"--resume: no complete checkpoint in {Path(work_dir) / CHECKPOINTS}; "
                "start without --resume, or pass --resume PATH"
            )
        return found[-1]
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
    """Remove what killed saves or prunes left behind; returns the names removed."""
    root = Path(work_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in stale]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half one under its name."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
