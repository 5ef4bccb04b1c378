"""The run's metric history: ``<work_dir>/metrics.jsonl``, one JSON object per logged step."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from hooktrain.checkpoint.files import write_atomically


class _Skip(Exception):
    """A value with no place in the history (an image, a mask)."""


def to_json(value: Any) -> Any:
    """``value`` as plain JSON data: tensors and numpy scalars become numbers, NaN and
    infinities become ``null`` (strict JSON has neither). Raises ``_Skip`` for arrays of two
    or more dimensions (images and masks belong on dashboards, not in the history)."""
    if _is_array(value):
        if value.ndim >= 2:
            raise _Skip
        value = value.tolist()  # a number for 0-d arrays and scalars, else a list
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _is_array(value: Any) -> bool:
    """A torch tensor, numpy array or numpy scalar, recognised without importing torch."""
    return hasattr(value, "ndim") and hasattr(value, "tolist")


class HistoryFile:
    """Appends ``{"iter": step, ...values}`` lines. Values logged at the same step (training
    scalars, then validation metrics) merge into one line, rewritten in place, so each line
    is on disk as soon as it is logged. Steps only move forward."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.last_step = -1
        self._last_record: dict[str, Any] = {}
        self._last_offset = 0  # where the last line starts
        self._size = 0
        self._file = None

    def open(self, resume_iter: int | None) -> None:
        """Start the file, or on a resume at ``resume_iter`` keep only the lines up to it:
        steps logged after the checkpoint are logged again by the resumed run."""
        kept = []
        if resume_iter is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half line of a killed write
                    continue
                if record.get("iter", math.inf) <= resume_iter:
                    kept.append(record)
        lines = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomically(self.path, lines)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (open for the whole run; each line written at once)
        self._size = len(lines.encode())
        if kept:
            self.last_step = kept[-1]["iter"]
            self._last_record = kept[-1]
            self._last_offset = self._size - len(json.dumps(kept[-1]).encode()) - 1

    def write(self, step: int, values: dict[str, Any]) -> bool:
        """Record ``values`` at ``step``; returns False (and writes nothing) for a step lower
        than the last one."""
        if step < self.last_step:
            return False
        record = {}
        for key, value in values.items():
            try:
                record[key] = to_json(value)
            except _Skip:
                continue
        if step == self.last_step:
            record = {**self._last_record, **record}
            self._file.truncate(self._last_offset)
        else:
            self._last_offset = self._size
            record = {"iter": step, **record}
        line = (json.dumps(record) + "\n").encode()
        try:
            if self._file.write(line) != len(line):  # appended: the file is open in append mode
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:  # a full disk: no half line stays, and the error names the file
            os.ftruncate(self._file.fileno(), self._size)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._size = self._last_offset + len(line)
        self.last_step, self._last_record = step, record
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
