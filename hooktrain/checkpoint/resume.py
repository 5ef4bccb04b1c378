"""Which checkpoint ``--resume`` continues from, and whether a checkpoint is whole.

A checkpoint is renamed into place only once every rank has written and flushed it, so a
kill never leaves a half one under its name. Disks and people still can: a full quota that
truncated a file, a file deleted by hand, a copy that stopped midway. Resuming from such a
checkpoint would fail deep inside ``torch.load``, so every file is checked first, in
milliseconds, without deserialising anything: presence, size, and each format's own framing.

What Accelerate 1.15's ``save_state`` writes (``accelerate/checkpointing.py``): the model
with safetensors; ``optimizer.bin``, ``custom_checkpoint_0.pkl``, ``scaler.pt`` and
``random_states_<r>.pkl`` with ``torch.save``, whose format is a zip archive. The runner's
``hooks.pt`` and ``data_state_rank<r>.pt`` are ``torch.save`` files too. A sharded checkpoint
(``train.sharded_checkpoint``) has ``sharded/`` instead of the model and optimizer files: each of
its files must be there at the size ``train_state.json`` records (:mod:`hooktrain.checkpoint.dcp`).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from hooktrain.checkpoint.layout import (
    CHECKPOINTS,
    LATEST,
    RANDOM_STATES_GLOB,
    RECIPE,
    SCALER,
    TRAIN_STATE,
    WEIGHTS,
)
from hooktrain.checkpoint.dcp import SHARDED_STATE, is_sharded_checkpoint, sharded_problems
from hooktrain.checkpoint.state import checkpoint_iteration, expected_files
from hooktrain.errors import UserError

logger = logging.getLogger("hooktrain")

_MAX_HEADER = 100_000_000  # the largest safetensors header the safetensors library accepts
_FP16 = re.compile(r"\bmixed_precision: ['\"]?fp16\b")


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint directory ``path``, as short phrases such as
    ``"optimizer.bin is missing"`` (``[]`` when it is whole)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path.name} is not a directory"]
    state, problems = _read_train_state(path / TRAIN_STATE)
    world_size = state.get("world_size")
    if world_size is None:  # check the ranks whose files are there
        world_size = max(1, len(list(path.glob(RANDOM_STATES_GLOB))))
    sharded = state.get("model_state") == SHARDED_STATE or (not state and is_sharded_checkpoint(path))
    if state and sharded:
        problems += sharded_problems(path, state)
    names = expected_files(world_size, sharded=sharded)
    if (path / SCALER).exists() or _written_with_fp16(path / RECIPE):
        names.append(SCALER)
    for name in names:
        if (problem := _file_problem(path / name)) is not None:
            problems.append(f"{name} {problem}")
    return problems


def _read_train_state(file: Path) -> tuple[dict, list[str]]:
    """What ``train_state.json`` records (with a valid ``world_size``), or ``{}`` and what is
    wrong with it."""
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        return {}, [f"{TRAIN_STATE} is missing"]
    except OSError as exc:
        return {}, [f"{TRAIN_STATE} cannot be read ({exc.strerror})"]
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return {}, [f"{TRAIN_STATE} is not valid JSON"]
    if not isinstance(state, dict):
        return {}, [f"{TRAIN_STATE} is not a JSON object"]
    bad = [k for k, least in (("iter", 0), ("world_size", 1)) if not _is_int(state.get(k), least)]
    if bad:
        return {}, [f"{TRAIN_STATE} has no valid {' or '.join(bad)}"]
    return state, []


def _is_int(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _written_with_fp16(recipe_file: Path) -> bool:
    try:
        return _FP16.search(recipe_file.read_text(errors="replace")) is not None
    except OSError:
        return False


def _file_problem(file: Path) -> str | None:
    """What is wrong with one file of a checkpoint, completing "<name> ...", else None."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not file.is_file():
        return "is not a file"
    if size == 0:
        return "is empty"
    try:
        if file.name == WEIGHTS:
            return _safetensors_problem(file, size)
        if file.suffix in (".bin", ".pt", ".pkl"):
            return _torch_file_problem(file, size)
        with open(file, "rb") as f:  # recipe.yaml: readable is enough
            f.read(1)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None


def _safetensors_problem(file: Path, size: int) -> str | None:
    """safetensors: an 8-byte little-endian header length, a JSON header giving each
    tensor's ``data_offsets`` in the data that follows; the file ends where the last one does."""
    if size < 8:
        return f"is truncated ({size:,} bytes)"
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > _MAX_HEADER:
            return f"has no safetensors header ({size:,} bytes)"
        if 8 + length > size:
            return f"is truncated ({size:,} bytes, less than its {8 + length:,}-byte header)"
        raw = f.read(length)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"has no valid safetensors header ({size:,} bytes)"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"has {size:,} bytes, more than the {expected:,} its header describes"
    return None


def _torch_file_problem(file: Path, size: int) -> str | None:
    """``torch.save`` writes a zip archive; opening one reads only its central directory,
    at the end of the file, which a truncated file has lost."""
    try:
        with zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, EOFError, ValueError):
        return f"is truncated or not a torch file ({size:,} bytes)"


def choose_resume(work_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` continues from, or None to start from iteration 0.

    ``"auto"`` (``--resume`` alone): the checkpoint ``latest`` names (the last this work dir
    saved, even after resuming from an older one), else the newest ``iter_*``, if whole; a
    damaged one is passed over for the newest whole one, with one warning naming it and what
    is wrong. With no whole checkpoint (a first start, a kill before the first save) it logs
    one line and returns None. Any other value is a checkpoint directory (or its ``latest``
    file) that must be whole; otherwise ``UserError`` names it, the problem and the fix.
    """
    work_dir = Path(work_dir)
    if resume != "auto":
        return _explicit_checkpoint(Path(resume), work_dir)
    root = work_dir / CHECKPOINTS
    damaged = []
    for path in _candidates(root):
        problems = checkpoint_problems(path)
        if not problems:
            if damaged:
                logger.warning("--resume: %s; resuming from %s", "; ".join(damaged), path.name)
            return path
        damaged.append(f"{path.name} is damaged ({', '.join(problems)})")
    detail = f" ({'; '.join(damaged)})" if damaged else ""
    log = logger.warning if damaged else logger.info
    log("--resume: no complete checkpoint in %s%s; starting from iteration 0", root, detail)
    return None


def _candidates(root: Path) -> list[Path]:
    """The ``iter_*`` checkpoints in ``root`` in the order ``--resume`` tries them: the one
    ``latest`` names first, then the others, newest first."""
    named = [p for p in root.glob("iter_*") if checkpoint_iteration(p) is not None]
    found = sorted((p for p in named if p.is_dir()), key=checkpoint_iteration, reverse=True)
    try:
        latest = root / (root / LATEST).read_text().strip()
    except OSError:
        return found
    return [latest, *(p for p in found if p != latest)] if latest in found else found


def _newest_whole(root: Path) -> Path | None:
    return next((p for p in _candidates(root) if not checkpoint_problems(p)), None)


def _explicit_checkpoint(path: Path, work_dir: Path) -> Path:
    if path.is_file() and path.name == LATEST:
        path = path.parent / path.read_text().strip()
    problems = checkpoint_problems(path) if path.exists() else ["it does not exist"]
    if not problems:
        return path
    whole = _newest_whole(path.parent) or _newest_whole(work_dir / CHECKPOINTS)
    fix = f"pick a whole one such as {whole}" if whole else "pick a whole one"
    raise UserError(
        f"--resume {path}: not a whole hooktrain checkpoint: {', '.join(problems)}; {fix}, "
        "or pass --resume alone to continue from the newest whole checkpoint of the work dir"
    )
