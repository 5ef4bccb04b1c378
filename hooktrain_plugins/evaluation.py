"""Evaluation hook: mIoU / mDice / mFscore on the validation split, exact across ranks.

The hook decides when to evaluate and keeps the best value of ``best_key``; the evaluation
itself (every rank predicting its share, the exact reduction, the metrics, the confusion files)
is :class:`hooktrain.evaluation.validation.Evaluation`, which ``hooktrain test`` runs too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from hooktrain.errors import UserError, did_you_mean
from hooktrain.evaluation.validation import EvalOptions, EvaluateModule, Evaluation, check_val_data
from hooktrain.hooks import PRIORITIES, Hook

__all__ = ["EvalHook", "EvaluateModule", "check_val_data"]


class EvalHook(Hook):
    """Evaluates mIoU / mDice / mFscore on the validation split every `interval` iterations.

    Metrics go to ``runner.state.metrics``, to ``after_val`` and to ``runner.log`` with a
    ``val/`` prefix; the best value of ``best_key`` is kept in ``runner.state.best`` before any
    later hook (a checkpoint saving the best model) runs in the same iteration.

    Args:
        interval: Evaluate every this many iterations.
        eval_at_end: Also evaluate after the last iteration.
        metrics: Metric families; aAcc is always computed, each family adds its per-class values and their means (mIoU: IoU, Acc; mDice: Dice, Acc; mFscore: Fscore, Precision, Recall).
        beta: The F-score's beta.
        nan_to_num: Replace NaN per-class values (classes absent from prediction and ground truth) by this before averaging; null skips them, as MMSegmentation does.
        best_key: Metric whose best value is tracked in runner.state.best (and saved by the checkpoint hook's save_best).
        rule: Whether greater or less is better for best_key.
        evaluate: Extra metrics from the evaluate library, as [{path: local module dir or Hub name, kwargs: {...}}]; each gets every prediction and reference on the main process (costly: full masks are gathered).
        num_samples: Validation images (input, prediction, ground truth) passed to the loggers per evaluation.
        loss: Also compute the decode head's loss terms on the very predictions that are scored (the same whole/slide/flip inference, at the original size; on the log of the averaged probabilities with flip or scales), logged as val/loss and val/decode.<term>: the mean over images of each image's loss.
        confusion: Reduce the full confusion matrix (C x C int64, one all-reduce), write it per evaluation to confusion/ as CSV and a row-normalised PNG heatmap, log the heatmap to the dashboards and add each class's top confusion to the table. Turn off for very many classes (it then reduces 4 x C area counts).
    """

    priority = PRIORITIES["HIGH"]

    def __init__(
        self,
        interval: Annotated[int, Field(gt=0)] = 4000,
        eval_at_end: bool = True,
        metrics: list[Literal["mIoU", "mDice", "mFscore"]] = ["mIoU", "mDice", "mFscore"],  # noqa: B006
        beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0,
        nan_to_num: Annotated[float, Field(allow_inf_nan=False)] | None = None,
        best_key: Annotated[str, Field(min_length=1)] = "mIoU",
        rule: Literal["greater", "less"] = "greater",
        evaluate: list[EvaluateModule] = [],  # noqa: B006
        num_samples: Annotated[int, Field(ge=0)] = 4,
        loss: bool = False,
        confusion: bool = True,
    ) -> None:
        if interval < 1:  # also when built in Python, without the recipe's option checks
            raise UserError("eval hook: interval must be at least 1")
        self.interval = interval
        self.eval_at_end = eval_at_end
        self.best_key = best_key
        self.rule = rule
        self.evaluation = Evaluation(EvalOptions(
            metrics=metrics, beta=beta, nan_to_num=nan_to_num, evaluate=evaluate,
            num_samples=num_samples, loss=loss, confusion=confusion,
        ))  # fmt: skip

    @property
    def confusion_matrix(self):
        """The ``[C, C]`` confusion matrix of the last evaluation (None before one)."""
        return self.evaluation.confusion_matrix

    def tracked_metrics(self, recipe=None) -> list[str]:
        """The scalar metrics every evaluation computes (the evaluate modules add theirs,
        named ``<module>/<key>``, which are only known once computed). A binary ``recipe``
        adds the foreground's: ``fgIoU``, ``fgDice``, ... (see :meth:`EvalOptions.scalar_metrics`)."""
        return self.evaluation.options.scalar_metrics(binary=recipe is not None and recipe.data.binary)

    def computes(self, key: str, recipe=None) -> bool:
        """Whether evaluations log ``key`` (:class:`hooktrain.hooks.Evaluator`): a tracked
        metric, or an ``<module>/<key>`` of the evaluate modules, known once computed."""
        return key in self.tracked_metrics(recipe) or (bool(self.evaluation.options.evaluate) and "/" in key)

    def metric_hint(self, key: str) -> str:
        if "loss" in key and not self.evaluation.options.loss:
            return " (validation losses need the eval hook's loss: true)"
        return ""

    def check_recipe(self, recipe, hooks) -> None:
        """Refuse a recipe without validation data, or a ``best_key`` no evaluation computes."""
        if recipe.data.val is None:
            raise UserError("eval hook: the recipe has no data.val section; add one, or remove the eval hook")
        if self.evaluation.options.loss and not hasattr(recipe.model.decode_head, "losses"):
            raise UserError(
                f"eval hook: loss: true scores per-pixel losses, and a {recipe.model.decode_head.type} decode head "
                "has none (its criterion matches queries to segments); set loss: false"
            )
        tracked = self.tracked_metrics(recipe)
        if not self.computes(self.best_key, recipe):
            raise UserError(
                f"eval hook: best_key '{self.best_key}' is not a computed metric"
                f"{did_you_mean(self.best_key, tracked)}; choose one of {tracked}"
            )

    def check_run(self, runner) -> None:
        """Check the first example of each validation shard before the run starts."""
        check_val_data(runner.recipe.data, world_size=runner.accelerator.num_processes)

    def before_run(self, runner) -> None:
        self.evaluation.load_modules()

    def after_train_iter(self, runner, outputs: dict[str, Any]) -> None:
        state = runner.state
        last = state.iter == state.max_iters
        if state.iter % self.interval == 0 or (last and self.eval_at_end):
            self.evaluate(runner)

    def evaluate(self, runner, name: str | None = None) -> dict[str, Any]:
        """Evaluate the whole validation split (:class:`Evaluation`) and publish the metrics;
        the best value is updated before ``after_val`` fires. The confusion files are named
        after ``name`` (default ``iter_<N>``)."""
        result = self.evaluation.compute(runner)
        self._update_best(runner, result.metrics)
        return self.evaluation.publish(runner, result, name)

    def _update_best(self, runner, metrics: dict[str, Any]) -> None:
        if self.best_key not in metrics:
            raise UserError(
                f"eval hook: best_key '{self.best_key}' is not a computed metric; "
                f"choose one of {sorted(metrics)}"
            )
        value = metrics[self.best_key]
        best = runner.state.best
        better = (
            not best
            or best.get("key") != self.best_key
            or (value > best["value"] if self.rule == "greater" else value < best["value"])
        )
        if better and value == value:  # NaN never becomes the best
            runner.state.best = {"key": self.best_key, "value": value, "iter": runner.state.iter}
