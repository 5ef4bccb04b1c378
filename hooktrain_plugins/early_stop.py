"""Early-stopping hook: ends the run when a validation metric stops improving.

It watches every evaluation (``after_val``; the eval hook all-reduces its metrics, so every
rank sees the same values and decides the same), counts the evaluations in a row without an
improvement larger than ``min_delta`` and, once the count reaches ``patience``, calls
``runner.request_finish``: the loop ends after that iteration like a finished run (``after_run``
fires, the checkpoint hook saves the final checkpoint, exit code 0). The best value, its
iteration and the count are saved in checkpoints, so ``--resume`` goes on counting; resuming a
run that stopped early stops again at once unless ``patience`` was raised.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from pydantic import Field

from hooktrain.errors import UserError, did_you_mean
from hooktrain.hooks import PRIORITIES, Hook, evaluators

logger = logging.getLogger("hooktrain")


class EarlyStopHook(Hook):
    """Stops the run when a validation metric has not improved for `patience` evaluations.

    Every evaluation of the eval hook either improves the best value of ``key`` by more than
    ``min_delta`` or counts one more evaluation without improvement (a NaN never improves).
    When the count reaches ``patience`` the run ends after that iteration as if it had reached
    ``max_iters``: the checkpoint hook saves the final checkpoint and the exit code is 0. The
    best value, its iteration and the count survive ``--resume``; resuming a run that stopped
    early stops again at once unless ``patience`` is larger.

    Args:
        key: Validation metric watched, as the eval hook names it (mIoU, aAcc, ...; loss needs its loss: true).
        rule: Whether greater or less is better for key (less for a loss).
        patience: Evaluations in a row without improvement after which the run stops.
        min_delta: An evaluation improves only when it beats the best value by more than this.
    """

    priority = PRIORITIES["NORMAL"]

    def __init__(
        self,
        key: Annotated[str, Field(min_length=1)] = "mIoU",
        rule: Literal["greater", "less"] = "greater",
        patience: Annotated[int, Field(ge=1)] = 5,
        min_delta: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0,
    ) -> None:
        if patience < 1:  # also when built in Python, without the recipe's option checks
            raise UserError(f"early_stop hook: patience must be at least 1 (got {patience})")
        if not min_delta >= 0:
            raise UserError(f"early_stop hook: min_delta must be at least 0 (got {min_delta})")
        self.key = key
        self.rule = rule
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_value: float | None = None
        self.best_iter: int | None = None
        self.count = 0  # evaluations in a row without improvement

    # -- checks ----------------------------------------------------------------------------

    def check_recipe(self, recipe, hooks) -> None:
        """Refuse a recipe without an eval hook, a ``key`` no evaluation computes, and a loss
        watched with ``rule: greater``."""
        found = evaluators(hooks)
        if not found:
            raise UserError(
                f"early_stop hook: it watches the validation metric '{self.key}' but the recipe has "
                "no eval hook; add one to hooks (e.g. {type: eval, interval: 1000}) or remove early_stop"
            )
        tracked = list(dict.fromkeys(name for h in found for name in h.hook.tracked_metrics(recipe)))
        if not any(h.hook.computes(self.key, recipe) for h in found):
            hint = next((hint for h in found if (hint := h.hook.metric_hint(self.key))), "")
            raise UserError(
                f"early_stop hook: key '{self.key}' is not a metric the eval hook computes"
                f"{did_you_mean(self.key, tracked)}; choose one of {tracked}{hint}"
            )
        if self.rule == "greater" and (self.key == "loss" or self.key.startswith("decode.")):
            raise UserError(
                f"early_stop hook: key '{self.key}' is a loss, which improves by going down, but "
                "rule is 'greater'; set the early_stop hook's rule: less"
            )

    # -- the rule --------------------------------------------------------------------------

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best value so far by more than ``min_delta`` (the first
        finite value always does; NaN never does)."""
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if self.rule == "greater":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(self, value: float, iteration: int) -> bool:
        """Record one evaluation's ``value`` at ``iteration``; whether the run should stop."""
        if self.improves(value):
            self.best_value, self.best_iter, self.count = value, iteration, 0
        else:
            self.count += 1
        return self.count >= self.patience

    def describe(self) -> str:
        """Why the run stops, for the log."""
        best = (
            f"best {self.best_value:.4f} at iteration {self.best_iter}"
            if self.best_value is not None
            else "no evaluation gave a number (NaN every time)"
        )
        patience = "" if self.count == self.patience else f" (patience {self.patience})"
        return (
            f"early stop: val {self.key} did not improve by more than {self.min_delta} "
            f"for {self.count} evaluations{patience}; {best}"
        )

    # -- stages ----------------------------------------------------------------------------

    def before_run(self, runner) -> None:
        if self.count >= self.patience:  # resumed a run that had already stopped early
            runner.request_finish(
                f"{self.describe()}; this run was resumed after it had stopped early, so it stops "
                f"again (raise the early_stop hook's patience above {self.count} to train on)"
            )

    def after_val(self, runner, metrics: dict[str, Any]) -> None:
        if self.key not in metrics:
            if len(evaluators(runner.hooks)) > 1:
                return  # another eval hook's evaluation
            raise UserError(
                f"early_stop hook: key '{self.key}' is not among the validation metrics; "
                f"choose one of {sorted(metrics)}"
            )
        value = float(metrics[self.key])
        if self.update(value, runner.state.iter):
            runner.request_finish(self.describe())
        elif self.count and runner.accelerator.is_main_process:
            logger.info(
                "early stop: val %s %.4f, no improvement by more than %s for %d of %d evaluations "
                "(best %.4f at iteration %d)",
                self.key, value, self.min_delta, self.count, self.patience,
                self.best_value if self.best_value is not None else math.nan, self.best_iter or 0,
            )  # fmt: skip

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "rule": self.rule,
            "best_value": self.best_value,
            "best_iter": self.best_iter,
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("key"), state.get("rule")) != (self.key, self.rule):
            logger.info(
                "early stop: the checkpoint watched %s (%s is better), this run watches %s (%s): "
                "counting starts over",
                state.get("key"), state.get("rule"), self.key, self.rule,
            )  # fmt: skip
            return
        self.best_value = state["best_value"]
        self.best_iter = state["best_iter"]
        self.count = int(state["count"])
