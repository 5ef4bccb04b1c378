"""``<work_dir>/stopped.json``: the mark of a run that stopped to be resumed.

A run stopped by SIGTERM / SIGINT, or by a data outage, saves its last iteration and every
rank exits with 143 / 130 / 75; but ``accelerate launch`` (torch elastic) exits with 1
whenever a rank did not exit with 0, exactly as after a failure, and on several machines each
launcher reports something else. So the run's main process writes this file once the stop's
checkpoint is whole, and a requeue script acts on the file instead of an exit status
(docs/checkpoints.md, "Requeue on a preemptible cluster"). A run removes it as it claims the
work dir (``hooktrain.checkpoint.workdir.claim_work_dir``); a run that failed or finished never
writes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from hooktrain.checkpoint.files import write_atomically
from hooktrain.checkpoint.layout import CHECKPOINTS, LATEST, STOPPED


def mark_stopped(work_dir: str | os.PathLike, *, reason: str, exit_code: int, iteration: int) -> Path:
    """Write ``work_dir/stopped.json`` and return its path. Call it on the main process only,
    after every rank is past the stop's save.

    It holds ``reason`` (``"SIGTERM"``, ``"SIGINT"`` or ``"data outage"``), the ``exit_code``
    the ranks exit with, the ``iteration`` the run stopped after, the ``checkpoint``
    ``--resume`` continues from (the name ``checkpoints/latest`` holds; null when none was
    saved), the host and the time.
    """
    work_dir = Path(work_dir)
    latest = work_dir / CHECKPOINTS / LATEST
    record = {
        "reason": reason,
        "exit_code": exit_code,
        "iteration": iteration,
        "checkpoint": latest.read_text().strip() if latest.is_file() else None,
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = work_dir / STOPPED
    write_atomically(path, json.dumps(record, indent=1) + "\n", fsync=True)
    return path


def clear_stopped(work_dir: str | os.PathLike) -> None:
    """Remove the mark an earlier run left in ``work_dir``, if any."""
    (Path(work_dir) / STOPPED).unlink(missing_ok=True)
