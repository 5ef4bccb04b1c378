"""Logger hook: console progress, ``metrics.jsonl`` history, wandb and TensorBoard dashboards.

Everything anything publishes through ``runner.log(values, step)`` goes to every sink when it
is produced; only the main process writes. See docs/logging.md.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from hooktrain.checkpoint.layout import HISTORY_FILE
from hooktrain.errors import UserError
from hooktrain.hooks import PRIORITIES, Hook

from .history import HistoryFile
from .trackers import Dashboards, TrackerName, WandbOptions, check_installed

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("hooktrain")


class LoggerHook(Hook):
    """Logs iteration progress and metrics to the console, metrics.jsonl, wandb and TensorBoard.

    Every ``interval`` iterations (and at the last one) it publishes the loss terms averaged
    over the interval and over ranks, the LR, the grad norm (when ``train.clip_grad_norm``
    is set), data and iteration time and, on GPU, peak memory. Whatever else is logged
    through ``runner.log`` (validation metrics, per-class values, sample images) is written
    when it is produced.

    Args:
        interval: Iterations between training log lines (and the last iteration).
        log_with: Dashboards through Accelerate's trackers: wandb, tensorboard (either or both).
        wandb: wandb run options {project, entity, name, tags, group, summary}; only with wandb in log_with (see docs/logging.md).
    """

    priority = PRIORITIES["BELOW_NORMAL"]

    def __init__(
        self,
        interval: Annotated[int, Field(gt=0)] = 50,
        log_with: list[TrackerName] = [],  # noqa: B006 (copied, never mutated)
        wandb: WandbOptions | None = None,
    ) -> None:
        if interval < 1:
            raise UserError(f"logger hook: interval must be at least 1 (got {interval})")
        if wandb is not None and "wandb" not in log_with:
            raise UserError(
                "logger hook: 'wandb' options are set but log_with does not include wandb; "
                "add log_with: [wandb] or drop the wandb options"
            )
        self.interval = interval
        self.log_with = list(dict.fromkeys(log_with))
        check_installed(self.log_with)
        self.wandb_options = wandb or WandbOptions()
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._times: list[float] = []
        self._data_times: list[float] = []
        self._history: HistoryFile | None = None
        self._dashboards: Dashboards | None = None
        self._wandb_run_id: str | None = None
        self._start_iter, self._start = 0, time.perf_counter()

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        run_id = self._dashboards.run_id if self._dashboards else self._wandb_run_id
        return {"wandb_run_id": run_id} if run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._wandb_run_id = state.get("wandb_run_id")

    # -- stages ----------------------------------------------------------------------------

    def before_run(self, runner) -> None:
        self._start_iter = runner.state.iter
        self._start = time.perf_counter()
        if not runner.accelerator.is_main_process:
            return
        resume_iter = runner.state.iter if runner.state.iter > 0 else None
        self._history = HistoryFile(runner.work_dir / HISTORY_FILE)
        self._history.open(resume_iter)
        if self.log_with:
            self._dashboards = Dashboards(self.log_with, self.wandb_options)
            self._dashboards.start(runner, self._wandb_run_id, resume_iter)
            if self._dashboards.run_id:
                logger.info("logger: wandb run %s", self._dashboards.run_id)

    def after_train_iter(self, runner, outputs: dict[str, Any]) -> None:
        import torch

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
        means = runner.accelerator.reduce(stacked, reduction="mean").tolist()  # every rank
        values: dict[str, Any] = {f"train/{n}": v for n, v in zip(names, means, strict=True)}
        values["train/lr"] = outputs["lr"]
        values["train/time"] = sum(self._times) / len(self._times)
        values["train/data_time"] = sum(self._data_times) / len(self._data_times)
        if runner.accelerator.device.type == "cuda":
            values["train/memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self._sums, self._count, self._times, self._data_times = {}, 0, [], []
        runner.log(values)

    def on_log(self, runner, values: dict[str, Any], step: int) -> None:
        if not runner.accelerator.is_main_process:
            return
        self._print(runner, values, step)
        if self._history is not None and not self._history.write(step, values):
            logger.warning(
                "logger: %s at step %d not written to %s: step %d is already there",
                sorted(values), step, HISTORY_FILE, self._history.last_step,
            )  # fmt: skip
        if self._dashboards is not None:
            self._dashboards.log(values, step)

    def after_run(self, runner) -> None:
        if self._history is not None:
            self._history.close()
        # The trackers are the Accelerator's now: accelerator.end_training() finishes them.

    # -- console ---------------------------------------------------------------------------

    def _print(self, runner, values: dict[str, Any], step: int) -> None:
        train = {k[6:]: v for k, v in values.items() if k.startswith("train/")}
        if train:
            logger.info("  ".join([f"iter {step}/{runner.state.max_iters}", *_train_fields(train),
                                   f"eta: {self._eta(runner)}"]))  # fmt: skip
        scalars = {
            k: v for k, v in values.items() if not k.startswith("train/") and isinstance(v, int | float)
        }
        if scalars:
            logger.info("iter %d  %s", step, "  ".join(f"{k}: {_fmt(v)}" for k, v in scalars.items()))

    def _eta(self, runner) -> datetime.timedelta:
        state = runner.state
        done = max(state.iter - self._start_iter, 1)
        elapsed = time.perf_counter() - self._start
        return datetime.timedelta(seconds=int(elapsed / done * (state.max_iters - state.iter)))


def _train_fields(train: dict[str, Any]) -> list[str]:
    """Loss terms first, then lr, grad norm, times and memory."""
    fields = [f"{k}: {_fmt(v)}" for k, v in train.items() if "loss" in k]
    if "lr" in train:
        fields.append(f"lr: {train['lr']:.3e}")
    if "grad_norm" in train:
        fields.append(f"grad_norm: {_fmt(train['grad_norm'])}")
    for key in ("time", "data_time"):
        if key in train:
            fields.append(f"{key}: {train[key]:.3f}s")
    if "memory_mb" in train:
        fields.append(f"memory: {train['memory_mb']:.0f} MB")
    known = {"lr", "grad_norm", "time", "data_time", "memory_mb"}
    fields += [f"{k}: {_fmt(v)}" for k, v in train.items() if "loss" not in k and k not in known]
    return fields


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)
