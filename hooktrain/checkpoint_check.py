"""Which checkpoint ``--resume`` continues from, and whether a checkpoint is whole.

A checkpoint is renamed into place only once every rank has written and flushed it, so a
kill never leaves a half one under its name. Disks and people still can: a full quota that
truncated a file, a file deleted by hand, a copy that stopped midway. Resuming from such a
checkpoint would fail deep inside ``torch.load`` (or fall back silently), so every file is
checked first, in milliseconds: presence, size, and each format's own end marker.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path

from hooktrain.checkpoints import (
    CHECKPOINTS,
    LATEST,
    TRAIN_STATE,
    WEIGHTS,
    complete_checkpoints,
    expected_files,
)
from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint directory ``path``, as short phrases (``[]`` when
    it is whole)."""
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
        world_size = int(state["world_size"])
        int(state["iter"])
    except FileNotFoundError:
        return [f"{TRAIN_STATE} is missing"]
    except (ValueError, KeyError, TypeError):
        return [f"{TRAIN_STATE} is not valid (JSON with iter and world_size)"]
    problems = []
    for name in expected_files(world_size):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif (problem := _file_problem(file)) is not None:
            problems.append(f"{name} {problem}")
    if (path / "scaler.pt").exists() and (problem := _file_problem(path / "scaler.pt")):
        problems.append(f"scaler.pt {problem}")
    return problems


def _file_problem(file: Path) -> str | None:
    size = file.stat().st_size
    if size == 0:
        return "is empty"
    if file.name == WEIGHTS:
        return _safetensors_problem(file, size)
    if file.suffix in (".bin", ".pt", ".pkl"):  # torch.save writes zip archives
        return (
            None
            if zipfile.is_zipfile(file)
            else f"is truncated or not a torch file ({size:,} bytes)"
        )
    return None


def _safetensors_problem(file: Path, size: int) -> str | None:
    """safetensors: an 8-byte header length, a JSON header, then the tensors' bytes."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if size - 8 < length < 2**27:  # a plausible header that the file cuts off
                return f"is truncated ({size:,} bytes, less than its {8 + length:,}-byte header)"
            header = json.loads(f.read(length))
    except (struct.error, ValueError):
        header = None
    if not isinstance(header, dict):
        return f"has no valid safetensors header ({size:,} bytes)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + length + end
    return None if size >= expected else f"is truncated ({size:,} of {expected:,} bytes)"


def choose_resume(work_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` continues from, or None to start from iteration 0.

    ``"auto"``: the one ``latest`` names (the last this work dir saved, even after resuming
    from an older one), else the newest; a damaged one is passed over with a warning for the
    newest whole one; none at all (a first start, or a kill before the first save) starts
    from scratch with one log line. Any other value is a checkpoint directory (or its
    ``latest`` file), which must be whole.
    """
    work_dir = Path(work_dir)
    if resume != "auto":
        return _explicit_checkpoint(Path(resume), work_dir)
    root = work_dir / CHECKPOINTS
    candidates = complete_checkpoints(work_dir)
    latest = _read_latest_name(root)
    if latest in [p.name for p in candidates]:  # saved last, even if older than the newest
        candidates = [p for p in candidates if p.name != latest] + [root / latest]
    damaged = []
    for path in reversed(candidates):
        problems = checkpoint_problems(path)
        if not problems:
            if damaged:
                logger.warning("--resume: %s; resuming from %s", "; ".join(damaged), path.name)
            return path
        damaged.append(f"{path.name} is damaged ({', '.join(problems)})")
    detail = f" ({'; '.join(damaged)})" if damaged else ""
    logger.info("--resume: no complete checkpoint in %s%s; starting from iteration 0", root, detail)
    return None


def _read_latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except OSError:
        return None


def _explicit_checkpoint(path: Path, work_dir: Path) -> Path:
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    problems = checkpoint_problems(path) if path.exists() else ["it does not exist"]
    if problems:
        example = work_dir / CHECKPOINTS / "iter_1000"
        raise UserError(
            f"--resume {path}: not a whole hooktrain checkpoint: {', '.join(problems)}; pick a "
            f"whole one such as {example}, or --resume alone for the newest whole one"
        )
    return path
