"""Console logger: training scalars every ``interval`` iterations, on the main process."""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch

from hooktrain.hooks import PRIORITIES, Hook

logger = logging.getLogger("hooktrain")


class LoggerHook(Hook):
    """Logs iteration, loss terms, lr, grad norm, data/iteration time and ETA to the console.

    Loss terms are averaged over the interval and over ranks. Anything logged through
    ``runner.log`` (validation metrics too) is printed when it is produced.
    """

    priority = PRIORITIES["BELOW_NORMAL"]

    def __init__(self, interval: int = 50) -> None:
        if interval < 1:
            raise ValueError("interval must be at least 1")
        self.interval = interval
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._times: list[float] = []
        self._data_times: list[float] = []

    def before_run(self, runner) -> None:
        self._last_iter = runner.state.iter
        self._start = time.perf_counter()

    def after_train_iter(self, runner, outputs: dict[str, Any]) -> None:
        for key, value in outputs.items():
            if torch.is_tensor(value):
                self._sums[key] = self._sums.get(key, 0) + value.detach().float()
        self._count += 1
        self._times.append(outputs["time"])
        self._data_times.append(outputs["data_time"])
        state = runner.state
        if state.iter % self.interval and state.iter != state.max_iters:
            return
        names = sorted(self._sums)
        stacked = torch.stack([self._sums[n] for n in names]) / self._count
        means = runner.accelerator.reduce(stacked, reduction="mean").tolist()
        values: dict[str, Any] = {f"train/{n}": v for n, v in zip(names, means, strict=True)}
        values["train/lr"] = outputs["lr"]
        values["train/time"] = sum(self._times) / len(self._times)
        values["train/data_time"] = sum(self._data_times) / len(self._data_times)
        if torch.cuda.is_available() and runner.accelerator.device.type == "cuda":
            values["train/memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self._sums, self._count, self._times, self._data_times = {}, 0, [], []
        runner.log(values)

    def on_log(self, runner, values: dict[str, Any], step: int) -> None:
        if not runner.accelerator.is_main_process:
            return
        state = runner.state
        train = {k[6:]: v for k, v in values.items() if k.startswith("train/")}
        other = {k: v for k, v in values.items() if not k.startswith("train/")}
        if train:
            elapsed = time.perf_counter() - self._start
            done = max(state.iter - self._last_iter, 1)
            eta = datetime.timedelta(seconds=int(elapsed / done * (state.max_iters - state.iter)))
            parts = [f"iter {step}/{state.max_iters}"]
            parts += [f"{k}: {_fmt(v)}" for k, v in train.items() if "loss" in k]
            parts += [f"lr: {train['lr']:.3e}"] if "lr" in train else []
            parts += [f"{k}: {_fmt(v)}" for k, v in train.items() if "loss" not in k and k != "lr"]
            parts.append(f"eta: {eta}")
            logger.info("  ".join(parts))
        scalars = {k: v for k, v in other.items() if isinstance(v, int | float)}
        if scalars:
            logger.info(
                "iter %d  %s", step, "  ".join(f"{k}: {_fmt(v)}" for k, v in scalars.items())
            )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)
