"""An exponential moving average of the weights, evaluated and checkpointed (a hooktrain plugin).

It averages the tensors each process holds, so it works the same under DDP and under FSDP
(``train.strategy: fsdp | fsdp2``), where each process holds shards; checkpoints get the whole
average, gathered like the model's weights (``runner.full_state_dict()``).
"""

from __future__ import annotations

from typing import Any

import torch

from hooktrain.checkpoint.sharded import load_full_state_dict
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
        self.average: list[torch.Tensor] | None = None  # this process's parameters and buffers
        self.n_averaged = 0
        self._runner = None
        self._pending_state: dict[str, Any] | None = None
        self._backup: list[torch.Tensor] = []

    def before_run(self, runner) -> None:
        self._runner = runner
        self.average = [t.detach().clone() for t in _local_tensors(runner.unwrapped_model)]
        if self._pending_state is not None:  # a resume restored our state before the run
            self._load(runner, self._pending_state)
            self._pending_state = None

    def after_train_iter(self, runner, outputs) -> None:
        it = runner.state.iter
        if it > self.begin_iter and it % self.interval == 0:
            with torch.no_grad():
                for average, live in zip(self.average, _local_tensors(runner.unwrapped_model), strict=True):
                    if self.n_averaged == 0 or not average.is_floating_point():
                        average.copy_(live)
                    else:
                        average.lerp_(live, self.momentum)
            self.n_averaged += 1

    def before_val(self, runner) -> None:
        if self.evaluate_ema and self.n_averaged > 0:
            self._backup = self._swap_in(runner, self.average)

    def after_val(self, runner, metrics) -> None:
        if self._backup:
            self._swap_in(runner, self._backup)
            self._backup = []

    def state_dict(self) -> dict[str, Any]:
        """The average as whole weights by name (on the main process; every rank calls it, as a
        checkpoint save does: under FSDP the shards are gathered)."""
        if self._runner is None or self.n_averaged == 0:
            return {"n_averaged": self.n_averaged}
        live = self._swap_in(self._runner, self.average)
        try:  # copied before the model's own weights go back (without FSDP these are the live tensors)
            weights = {k: v.detach().cpu().clone() for k, v in self._runner.full_state_dict().items()}
        finally:
            self._swap_in(self._runner, live)
        return {"n_averaged": self.n_averaged, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._runner is None:
            self._pending_state = state
        else:
            self._load(self._runner, state)

    def _load(self, runner, state: dict[str, Any]) -> None:
        """Take this rank's part of the saved average: load it into the model (each rank keeps its
        shard), copy it out, put the model's own weights back."""
        self.n_averaged = int(state["n_averaged"])
        # Checkpoints of earlier versions hold torch's AveragedModel state ("module.<name>").
        weights = state.get("weights") or {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
        if not weights:
            return
        live = [t.detach().clone() for t in _local_tensors(runner.unwrapped_model)]
        load_full_state_dict(runner.model, weights)
        self.average = [t.detach().clone() for t in _local_tensors(runner.unwrapped_model)]
        self._swap_in(runner, live)

    @staticmethod
    def _swap_in(runner, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``values`` into the model's tensors; returns copies of what they held."""
        targets = _local_tensors(runner.unwrapped_model)
        held = [t.detach().clone() for t in targets]
        with torch.no_grad():
            for target, value in zip(targets, values, strict=True):
                target.copy_(value)
        return held


def _local_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers this process holds: whole ones, or under FSDP its shards
    (FSDP2's DTensor parameters give their local part)."""
    tensors = [*module.parameters(), *module.buffers()]
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
