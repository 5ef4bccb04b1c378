"""The run directory: refusing to overwrite a run, ``--force``, and the resolved recipe."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hooktrain.checkpoints import CHECKPOINTS, clean_stale, complete_checkpoints
from hooktrain.checkpoints import write_text_atomically
from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")


def check_work_dir(work_dir: Path, force: bool) -> None:
    """Refuse to start a fresh run over a work dir holding checkpoints, unless ``force``."""
    if not force and complete_checkpoints(work_dir):
        raise UserError(
            f"{work_dir} already holds checkpoints; pass --resume to continue that run, "
            "--force to start over in it (the old checkpoints are moved aside), "
            "or --work-dir to choose another directory"
        )


def prepare_work_dir(work_dir: Path, recipe_text: str, *, move_aside: bool) -> None:
    """Main process only: move old checkpoints aside (``--force``), remove what killed saves
    left, and write the resolved recipe."""
    old = work_dir / CHECKPOINTS
    if move_aside and old.is_dir():
        aside = work_dir / f"{CHECKPOINTS}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        old.rename(aside)
        logger.warning("--force: moved the previous checkpoints to %s", aside)
    for name in clean_stale(work_dir):
        logger.warning("removed %s, left by an interrupted save", name)
    write_text_atomically(work_dir / "recipe.yaml", recipe_text)
