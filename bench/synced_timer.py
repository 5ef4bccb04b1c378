"""A bench-only hook: wall time between two iterations with the GPU synchronised at both ends.

The runner's per-iteration ``time`` is read without a CUDA synchronisation (one per step would
cost throughput), so a step's queued kernels may finish inside the next step's figure. This hook
synchronises twice per run, after iteration ``start`` and after the last one, and writes
``{"iters": [start, last], "seconds": t}`` to ``out`` (JSON, main process).

    hooks=[..., {type: 'synced_timer:SyncedTimer', start: 20, out: timing.json}]   # bench/ on PYTHONPATH
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hooktrain.hooks import PRIORITIES, Hook


class SyncedTimer(Hook):
    """Times iterations ``start + 1`` .. ``max_iters`` with synchronised clocks."""

    priority = PRIORITIES["LOWEST"]

    def __init__(self, start: int, out: str) -> None:
        self.start, self.out = start, Path(out)
        self.marks: list[tuple[int, float]] = []

    def after_train_iter(self, runner, outputs) -> None:
        if runner.state.iter in (self.start, runner.state.max_iters):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((runner.state.iter, time.perf_counter()))

    def after_run(self, runner) -> None:
        if runner.accelerator.is_main_process and len(self.marks) == 2:
            (first, t0), (last, t1) = self.marks
            self.out.write_text(json.dumps({"iters": [first, last], "seconds": t1 - t0}))
