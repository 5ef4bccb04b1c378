"""The run directory: one run at a time, refusing to overwrite a run, ``--force``, and the
resolved recipe."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from hooktrain.checkpoint.files import write_atomically
from hooktrain.checkpoint.layout import HISTORY_FILE, LOCK_FILE, RECIPE
from hooktrain.checkpoint.lock import lock_work_dir
from hooktrain.checkpoint.state import clean_stale, complete_checkpoints
from hooktrain.checkpoint.stopped import clear_stopped
from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")


PREVIOUS_PREFIX = "previous-"  # --force moves an earlier run's files into previous-<time>/


@contextmanager
def claim_work_dir(work_dir: Path, *, force: bool, resume: bool, main_process: bool = True) -> Iterator[None]:
    """Hold ``work_dir`` for the run inside the block: the main process locks it
    (:func:`hooktrain.checkpoint.lock.lock_work_dir`; the other processes hold nothing) and
    removes an earlier run's ``stopped.json`` (:mod:`hooktrain.checkpoint.stopped`), then
    :func:`check_work_dir` refuses what would clobber a run. The lock goes when the block ends."""
    with lock_work_dir(work_dir) if main_process else nullcontext():
        if main_process:
            # Before any check can fail: a requeue script must not rerun an attempt that failed.
            clear_stopped(work_dir)
        check_work_dir(work_dir, force=force, resume=resume)
        yield


def check_work_dir(work_dir: Path, *, force: bool, resume: bool) -> None:
    """Refuse a work dir that is a file, and a fresh run (not ``resume``) over one holding
    checkpoints unless ``force``."""
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"work dir {work_dir} is a file, not a directory; pass --work-dir with a directory path")
    if not resume and not force and complete_checkpoints(work_dir):
        raise UserError(
            f"{work_dir} already holds checkpoints; pass --resume to continue that run, "
            "--force to start over in it (the old run's files are moved aside), "
            "or --work-dir to choose another directory"
        )


def prepare_work_dir(work_dir: Path, recipe_text: str, *, move_aside: bool) -> None:
    """Main process only, once every check passed: move an earlier run aside (``--force``),
    remove what killed saves left, and write the resolved recipe."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if move_aside and (aside := move_previous_run(work_dir)) is not None:
        logger.warning("--force: moved the previous run's files (checkpoints, %s, ...) to %s", HISTORY_FILE, aside)
    for name in clean_stale(work_dir):
        logger.warning("removed %s, left by an interrupted save", name)
    write_atomically(work_dir / RECIPE, recipe_text, fsync=True)


def move_previous_run(work_dir: Path) -> Path | None:
    """Move every file of the run in ``work_dir`` (not the runs moved aside before) into
    ``work_dir/previous-<time>/``; nothing is deleted. Returns that directory, or None when
    there was nothing to move."""
    entries = [p for p in work_dir.iterdir() if not p.name.startswith(PREVIOUS_PREFIX) and p.name != LOCK_FILE]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = work_dir / f"{PREVIOUS_PREFIX}{stamp}"
    suffix = 1
    while aside.exists():
        aside = work_dir / f"{PREVIOUS_PREFIX}{stamp}-{suffix}"
        suffix += 1
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside
