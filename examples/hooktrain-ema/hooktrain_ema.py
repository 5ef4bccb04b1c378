"""An exponential moving average of the weights, evaluated and checkpointed (a hooktrain plugin)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hooktrain.errors import UserError
from hooktrain.hooks import PRIORITIES, Hook


class EMAHook(Hook):
    """Keeps an exponential moving average of the weights; evaluates and checkpoints it.

    Args:
        momentum: Weight of the newest parameters in each update (ema = (1 - m) * ema + m * w).
        interval: Update the average every this many iterations.
        begin_iter: Start averaging after this iteration (the first update copies the weights).
        evaluate_ema: Swap the average in for validation (before_val .. after_val).
    """

    # Before the eval hook (HIGH), so an evaluation sees this iteration's average.
    priority = PRIORITIES["VERY_HIGH"]

    def __init__(
        self,
        momentum: float = 0.0002,
        interval: int = 1,
        begin_iter: int = 0,
        evaluate_ema: bool = True,
    ) -> None:
        if not 0 < momentum <= 1:
            raise UserError(f"ema hook: momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.interval = interval
        self.begin_iter = begin_iter
        self.evaluate_ema = evaluate_ema
        self.ema: AveragedModel | None = None
        self._pending_state: dict[str, Any] | None = None
        self._backup: list[torch.Tensor] = []

    def before_run(self, runner) -> None:
        model = runner.unwrapped_model
        self.ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(1 - self.momentum), use_buffers=True
        )
        if self._pending_state is not None:  # a resume restored our state before the run
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None

    def after_train_iter(self, runner, outputs) -> None:
        it = runner.state.iter
        if it > self.begin_iter and it % self.interval == 0:
            self.ema.update_parameters(runner.unwrapped_model)

    def _tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def before_val(self, runner) -> None:
        if self.evaluate_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            live = self._tensors(runner.unwrapped_model)
            self._backup = [t.detach().clone() for t in live]
            with torch.no_grad():
                for target, average in zip(live, self._tensors(self.ema.module), strict=True):
                    target.copy_(average)

    def after_val(self, runner, metrics) -> None:
        if self._backup:
            with torch.no_grad():
                for target, saved in zip(self._tensors(runner.unwrapped_model), self._backup, strict=True):
                    target.copy_(saved)
            self._backup = []

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is None:
            self._pending_state = state
        else:
            self.ema.load_state_dict(state)
