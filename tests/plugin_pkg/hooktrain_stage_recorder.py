"""A third-party hook distributed on its own: appends each stage it sees to a JSON-lines file."""

from __future__ import annotations

import json

from hooktrain.hooks import Hook


class StageRecorderHook(Hook):
    """Records every hook stage (with the iteration) to a JSON-lines file."""

    def __init__(self, path: str, tag: str = "recorder") -> None:
        self.path = path
        self.tag = tag

    def _record(self, runner, stage: str, **extra) -> None:
        if runner.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"tag": self.tag, "stage": stage, "iter": runner.state.iter, **extra}) + "\n")

    def before_run(self, runner):
        self._record(runner, "before_run")

    def before_train_iter(self, runner):
        self._record(runner, "before_train_iter")

    def after_train_iter(self, runner, outputs):
        self._record(runner, "after_train_iter", loss=float(outputs["loss"]), lr=outputs["lr"])

    def after_run(self, runner):
        self._record(runner, "after_run")
