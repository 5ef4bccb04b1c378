"""Evaluation hook: mIoU / mDice / mFscore on the validation split, exact across ranks.

Each rank predicts its own share of the validation split (``build_val_loader`` gives every
example to exactly one rank, so there is no padding to drop), reduces every prediction to its
confusion matrix on the device (one ``bincount``, ``hooktrain.evaluation.metrics.confusion_counts``) and
sums them. One all-reduce of about ``C * C`` int64 values then gives every rank the exact
matrix, whatever the number of ranks, workers or batches per rank; the areas, metrics and each
class's top confusion come from it. With ``confusion: false`` only the ``4 * C + 1`` area
counts cross ranks. With ``loss: true`` each image's decode-head loss terms are summed in
float64 and all-reduced with the image count: ``val/loss`` is the mean over images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from hooktrain.errors import UserError, did_you_mean
from hooktrain.hooks import PRIORITIES, Hook
from hooktrain.recipe.section import Section

if TYPE_CHECKING:  # torch and the data/metrics modules load when a run starts, not on import
    import numpy as np
    import torch

    from hooktrain.evaluation.metrics import Areas

logger = logging.getLogger("hooktrain")

# The scalar metrics each family adds to aAcc (see hooktrain.evaluation.metrics.summarize).
FAMILY_SCALARS = {"mIoU": ("mIoU", "mAcc"), "mDice": ("mDice", "mAcc"), "mFscore": ("mFscore", "mPrecision", "mRecall")}


class EvaluateModule(Section):
    """An extra metric from the ``evaluate`` library, computed on the main process."""

    path: str = Field(description="evaluate.load() argument: a local module path or a Hub name.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of its compute()."
    )


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
        self.metrics = list(metrics)
        self.beta = beta
        self.nan_to_num = nan_to_num
        self.best_key = best_key
        self.rule = rule
        self.evaluate_specs = list(evaluate)
        self.num_samples = num_samples
        self.loss = loss
        self.confusion = confusion
        self.confusion_matrix: np.ndarray | None = None  # [C, C] of the last evaluation
        self._evaluate_modules: list = []

    def tracked_metrics(self, recipe=None) -> list[str]:
        """The scalar metrics every evaluation computes (the evaluate modules add theirs,
        named ``<module>/<key>``, which are only known once computed). A binary ``recipe``
        adds the foreground's: ``fgIoU``, ``fgDice``, ... (see :func:`_foreground_scalars`)."""
        scalars = ["aAcc"] + [name for family in self.metrics for name in FAMILY_SCALARS[family]]
        if recipe is not None and recipe.data.binary:
            scalars += ["fg" + name[1:] for name in scalars if name.startswith("m")]
        return list(dict.fromkeys(scalars + (["loss"] if self.loss else [])))

    def computes(self, key: str, recipe=None) -> bool:
        """Whether evaluations log ``key`` (:class:`hooktrain.hooks.Evaluator`): a tracked
        metric, or an ``<module>/<key>`` of the evaluate modules, known once computed."""
        return key in self.tracked_metrics(recipe) or (bool(self.evaluate_specs) and "/" in key)

    def metric_hint(self, key: str) -> str:
        if "loss" in key and not self.loss:
            return " (validation losses need the eval hook's loss: true)"
        return ""

    def check_recipe(self, recipe, hooks) -> None:
        """Refuse a recipe without validation data, or a ``best_key`` no evaluation computes."""
        if recipe.data.val is None:
            raise UserError("eval hook: the recipe has no data.val section; add one, or remove the eval hook")
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
        self._evaluate_modules = [_load_evaluate(spec) for spec in self.evaluate_specs]

    def after_train_iter(self, runner, outputs: dict[str, Any]) -> None:
        state = runner.state
        last = state.iter == state.max_iters
        if state.iter % self.interval == 0 or (last and self.eval_at_end):
            self.evaluate(runner)

    def evaluate(self, runner, name: str | None = None) -> dict[str, Any]:
        """Predict the whole validation split, reduce across ranks, publish the metrics. The
        confusion files are named after ``name`` (default ``iter_<N>``)."""
        from hooktrain.evaluation.metrics import format_table, summarize, top_confusions

        runner.call_hooks("before_val")
        if not self._evaluate_modules and self.evaluate_specs:
            self._evaluate_modules = [_load_evaluate(spec) for spec in self.evaluate_specs]
        self._samples: list[dict[str, Any]] = []
        totals = self._predict_totals(runner)
        summary = summarize(totals.areas, self.metrics, beta=self.beta, nan_to_num=self.nan_to_num)
        data = runner.recipe.data
        metrics: dict[str, Any] = dict(summary.scalars)
        if data.binary:
            metrics.update(_foreground_scalars(summary.per_class))
        metrics.update(totals.losses)
        for module in self._evaluate_modules:
            metrics.update(self._compute_evaluate(runner, module))
        self._update_best(runner, metrics)
        runner.state.metrics = metrics
        logged: dict[str, Any] = {f"val/{k}": v for k, v in metrics.items()}
        notes = {}
        if totals.confusion is not None:
            self.confusion_matrix = totals.confusion
            notes["Top confusion"] = top_confusions(totals.confusion, data.names)
            if runner.accelerator.is_main_process:
                logged["val/confusion_matrix"] = _write_confusion(
                    runner, totals.confusion, data.names, name or f"iter_{runner.state.iter}"
                )
        if runner.accelerator.is_main_process:
            logger.info(
                "validation at iter %d on %d images:\n%s",
                runner.state.iter, totals.num_images, format_table(summary.per_class, data.names, notes),
            )  # fmt: skip
        if totals.num_out_of_range:
            logger.warning(
                "validation: %d pixels had labels outside [0, %d) and were not scored",
                totals.num_out_of_range, data.num_labels,
            )  # fmt: skip
        runner.call_hooks("after_val", metrics)
        logged["val/per_class"] = {key: values.tolist() for key, values in summary.per_class.items()}
        if self._samples:
            logged["val/samples"] = self._samples
        runner.log(logged)
        return metrics

    def _predict_totals(self, runner) -> _Totals:
        """Predict this rank's share of the validation split and reduce the counts (and loss
        sums) of every rank: exact totals on every rank."""
        import torch

        from hooktrain.data import build_val_loader
        from hooktrain.evaluation.metrics import Areas, confusion_counts, intersect_and_union
        from hooktrain.models.inference import predicted_labels

        accelerator = runner.accelerator
        device = accelerator.device
        data = runner.recipe.data
        model = runner.unwrapped_model
        num_classes = data.num_labels  # binary: background and foreground are both scored
        counts = (
            torch.zeros((num_classes + 2, num_classes + 1), dtype=torch.int64, device=device)
            if self.confusion
            else Areas.zeros(num_classes, device=device).pack()
        )
        terms = model.decode_loss.term_names if self.loss else []
        loss_sums = torch.zeros(len(terms), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        loader = build_val_loader(
            data, rank=accelerator.process_index, world_size=accelerator.num_processes,
            scales=model.inference.scales,
        )  # fmt: skip
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                for batch in loader:
                    logits = _predict(model, batch, device)
                    for i, image_logits in enumerate(logits):
                        height, width = batch["ori_shapes"][i]
                        label = batch["mask"][i, :height, :width].to(device)
                        pred = predicted_labels(image_logits, model.inference)
                        if len(self._samples) < self.num_samples and accelerator.is_main_process:
                            self._samples.append(_sample(batch, i, pred, data))
                        if self.confusion:
                            counts += confusion_counts(pred, label, num_classes, data.ignore_index)
                        else:
                            counts += intersect_and_union(pred, label, num_classes, data.ignore_index).pack()
                        if terms:
                            loss_sums += _image_loss(model, image_logits, label, terms)
                        for module in self._evaluate_modules:
                            module.pending.append((pred.cpu().numpy(), label.cpu().numpy()))
                    count += len(logits)
                    self._flush_pending(accelerator.num_processes == 1)
        finally:
            model.train(was_training)
        packed = accelerator.reduce(torch.cat([counts.reshape(-1), count[None]]), reduction="sum")
        num_images = int(packed[-1])
        losses = {}
        if terms:
            sums = accelerator.reduce(loss_sums, reduction="sum").cpu().tolist()
            means = {f"decode.{term}": total / max(num_images, 1) for term, total in zip(terms, sums, strict=True)}
            losses = {"loss": sum(means.values()), **means}
        if self.confusion:
            extended = packed[:-1].reshape(num_classes + 2, num_classes + 1)
            return _Totals.from_confusion(extended, num_images, losses)
        return _Totals(Areas.unpack(packed[:-1]), None, num_images, losses)

    def _flush_pending(self, single_process: bool) -> None:
        """Hand the batch's predictions to each evaluate module: straight to ``add_batch``
        (which spills them to disk) in one process; kept until the end-of-pass gather in
        several, because ranks see different numbers of batches."""
        for module in self._evaluate_modules:
            if module.pending:
                preds, labels = (list(x) for x in zip(*module.pending, strict=True))
                module.pending.clear()
                if single_process:
                    module.metric.add_batch(predictions=preds, references=labels)
                else:
                    module.local_batches.append((preds, labels))

    def _compute_evaluate(self, runner, module) -> dict[str, Any]:
        """Gather every rank's predictions on the main process and run the module there."""
        from accelerate.utils import gather_object

        if runner.accelerator.num_processes > 1:
            gathered = gather_object([module.local_batches])  # one list per rank
            module.local_batches = []
            if runner.accelerator.is_main_process:
                for preds, labels in (b for rank_batches in gathered for b in rank_batches):
                    module.metric.add_batch(predictions=preds, references=labels)
        if not runner.accelerator.is_main_process:
            return {}
        kwargs = {"num_labels": runner.recipe.data.num_labels,
                  "ignore_index": runner.recipe.data.ignore_index, **module.spec.kwargs}  # fmt: skip
        result = module.metric.compute(**kwargs) or {}
        name = module.metric.name
        return {
            f"{name}/{key}": float(value)
            for key, value in result.items()
            if isinstance(value, int | float) or getattr(value, "ndim", 1) == 0
        }

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


@dataclass(frozen=True)
class _Totals:
    """One evaluation's exact totals over every rank."""

    areas: Areas
    confusion: np.ndarray | None  # [C, C] int64: ground truth x prediction, ignored pixels left out
    num_images: int
    losses: dict[str, float]  # "loss" and "decode.<term>": means over images (empty without loss: true)

    @property
    def num_out_of_range(self) -> int:
        return int(self.areas.num_out_of_range)

    @classmethod
    def from_confusion(cls, extended: torch.Tensor, num_images: int, losses: dict[str, float]) -> _Totals:
        from hooktrain.evaluation.metrics import areas_from_confusion

        num_classes = extended.shape[1] - 1
        confusion = extended[:num_classes, :num_classes].cpu().numpy()
        return cls(areas_from_confusion(extended), confusion, num_images, losses)


def _foreground_scalars(per_class: dict[str, Any]) -> dict[str, float]:
    """Binary segmentation's foreground (label 1) metrics as scalars: ``fgIoU``, ``fgAcc``,
    ``fgDice``, ``fgFscore``, ``fgPrecision``, ``fgRecall`` (those computed)."""
    return {f"fg{key}": float(values[1]) for key, values in per_class.items()}


def _image_loss(model, scores: torch.Tensor, label: torch.Tensor, terms: list[str]) -> torch.Tensor:
    """The decode head's weighted loss terms of one image's scored prediction, in float64."""
    import torch

    from hooktrain.models.inference import as_logits

    with torch.autocast(scores.device.type, enabled=False):
        values = model.decode_loss(as_logits(scores, model.inference)[None], label[None].long())
    return torch.stack([values[term].detach().double() for term in terms])


def _write_confusion(runner, matrix: np.ndarray, names: list[str], name: str) -> np.ndarray:
    """Write ``confusion/confusion_<name>.csv`` and ``.png`` in the work dir; returns the
    heatmap (RGB) for the dashboards."""
    from hooktrain.evaluation.confusion import render_heatmap, write_confusion_csv, write_heatmap

    directory = Path(runner.work_dir) / "confusion"
    directory.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(matrix, names, directory / f"confusion_{name}.csv")
    heatmap = render_heatmap(matrix, names, title=f"confusion, {name.replace('_', ' ')} (rows sum to 100%)")
    write_heatmap(heatmap, directory / f"confusion_{name}.png")
    return heatmap


def check_val_data(data, *, world_size: int = 1) -> None:
    """Decode and check the first example of each validation shard (a folder source is one
    shard) as the evaluation will, so a bad mask or image in the validation split stops the
    run before its first iteration rather than at its first evaluation."""
    from hooktrain.data.reading import check_first_examples
    from hooktrain.data.sources import load_source
    from hooktrain.data.transforms import ValTransform
    from hooktrain.recipe.data import FolderSource

    if data.val is None:
        return  # nothing to check (the eval hook's check_recipe refuses such a recipe)
    start = time.perf_counter()
    base = load_source(data.val.source, where="data.val.source")
    transform = ValTransform(data.val.pipeline, mean=data.mean, std=data.std)
    num_shards = 1 if isinstance(data.val.source, FolderSource) else None
    checked = check_first_examples(data, base, transform, num_shards=num_shards, world_size=world_size)
    logger.info("eval hook: checked the first example of %d validation shard(s) in %.2fs",
                checked, time.perf_counter() - start)  # fmt: skip


def _predict(model, batch: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
    """Per-image scores at the original size; with ``model.inference.scales`` the multi-scale
    test of each image, one view at a time (see ``hooktrain.models.inference``)."""
    from hooktrain.models.inference import predict_scales

    if "views" not in batch:
        image = batch["image"].to(device, non_blocking=True)
        return model.predict(image, batch["img_shapes"], batch["ori_shapes"])
    return [
        predict_scales(model.logits, (view[None].to(device) for view in views), ori_shape,
                       model.inference, model.align_corners)
        for views, ori_shape in zip(batch["views"], batch["ori_shapes"], strict=True)
    ]  # fmt: skip


def _sample(batch: dict[str, Any], i: int, pred: torch.Tensor, data) -> dict[str, Any]:
    """One validation image for dashboards: the input (de-normalised, at its original size),
    the prediction and the ground truth, as numpy arrays."""
    import cv2
    import numpy as np

    from hooktrain.tools.preview import preview

    height, width = batch["img_shapes"][i]
    ori_h, ori_w = batch["ori_shapes"][i]
    image = preview(batch["image"][i, :, :height, :width].float().cpu().numpy(), data.mean, data.std)
    image = cv2.resize(image, (ori_w, ori_h), interpolation=cv2.INTER_LINEAR)
    return {
        "image": image,
        "prediction": pred.cpu().numpy().astype(np.int64),
        "ground_truth": batch["mask"][i, :ori_h, :ori_w].cpu().numpy().astype(np.int64),
    }


class _LoadedEvaluate:
    def __init__(self, spec: EvaluateModule, metric) -> None:
        self.spec = spec
        self.metric = metric
        self.pending: list = []
        self.local_batches: list = []


def _load_evaluate(spec: EvaluateModule) -> _LoadedEvaluate:
    import evaluate

    try:
        return _LoadedEvaluate(spec, evaluate.load(spec.path))
    except Exception as exc:  # evaluate raises FileNotFoundError, ConnectionError, ImportError...
        raise UserError(
            f"eval hook: cannot load evaluate module '{spec.path}' ({type(exc).__name__}: {exc}); "
            "give a local module path (the Hub is unreachable offline)"
        ) from None
