"""One evaluation of the validation split, exact across ranks: the core that the eval hook and
``hooktrain test`` (with or without TTA) both run.

Each rank predicts its own share of the validation split (``build_val_loader`` gives every
example to exactly one rank, so there is no padding to drop), reduces every prediction to its
confusion matrix on the device (one ``bincount``, ``hooktrain.evaluation.metrics.confusion_counts``) and
sums them. One all-reduce of about ``C * C`` int64 values then gives every rank the exact
matrix, whatever the number of ranks, workers or batches per rank; the areas, metrics and each
class's top confusion come from it. With ``confusion: false`` only the ``4 * C + 1`` area
counts cross ranks. With ``loss: true`` each image's decode-head loss terms are summed in
float64 and all-reduced with the image count: ``val/loss`` is the mean over images.

::

    evaluation = Evaluation(EvalOptions(metrics=["mIoU"]))
    metrics = evaluation.run(runner, name="test")   # on every rank; {"aAcc": ..., "mIoU": ...}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from hooktrain.errors import UserError, describe
from hooktrain.recipe.section import Section

if TYPE_CHECKING:  # torch and the data/metrics modules load when an evaluation runs, not on import
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


class EvalOptions(pydantic.BaseModel):
    """What an evaluation computes: the eval hook's options of the same names, documented there
    (``hooktrain reference``); the hook's schedule and best tracking are not part of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: list[Literal["mIoU", "mDice", "mFscore"]] = ["mIoU", "mDice", "mFscore"]
    beta: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    nan_to_num: Annotated[float, Field(allow_inf_nan=False)] | None = None
    evaluate: list[EvaluateModule] = []
    num_samples: Annotated[int, Field(ge=0)] = 4
    loss: bool = False
    confusion: bool = True

    @classmethod
    def from_hook_options(cls, options: Mapping[str, Any], where: str = "eval hook") -> EvalOptions:
        """The evaluation options among an eval hook's recipe ``options`` (its others, such as
        ``interval`` or ``best_key``, are left out), validated; a bad value is a one-line
        ``UserError`` naming ``where``."""
        picked = {key: value for key, value in options.items() if key in cls.model_fields}
        try:
            return cls.model_validate(picked)
        except pydantic.ValidationError as exc:
            raise UserError(describe(exc, cls, picked, noun="option", prefix=[where])) from None

    def scalar_metrics(self, binary: bool = False) -> list[str]:
        """The scalar metrics every evaluation computes, in order; ``binary`` adds the
        foreground's (``fgIoU``, ``fgDice``, ...). The evaluate modules add theirs, named
        ``<module>/<key>``, which are only known once computed."""
        scalars = ["aAcc"] + [name for family in self.metrics for name in FAMILY_SCALARS[family]]
        if binary:
            scalars += ["fg" + name[1:] for name in scalars if name.startswith("m")]
        return list(dict.fromkeys(scalars + (["loss"] if self.loss else [])))


@dataclass(frozen=True)
class EvalResult:
    """One evaluation's outcome, the same on every rank (``samples`` only on the main process,
    the evaluate modules' metrics too)."""

    metrics: dict[str, Any]  # the scalars: aAcc, mIoU, ..., loss, <module>/<key>
    per_class: dict[str, np.ndarray]  # IoU, Acc, ...: one value per class
    confusion: np.ndarray | None  # [C, C] int64: ground truth x prediction (None with confusion: false)
    num_images: int
    num_out_of_range: int  # pixels whose label was outside [0, num_labels), not scored
    samples: list[dict[str, Any]]  # up to num_samples {image, prediction, ground_truth}


class Evaluation:
    """Evaluates the runner's model on the recipe's validation split.

    ``runner`` is anything with ``accelerator``, ``whole_model``, ``recipe``, ``state``,
    ``work_dir``, ``call_hooks`` and ``log`` (``hooktrain.hooks.Runner``). Every rank must call
    :meth:`run` (or :meth:`compute`) together: the totals are all-reduced. One instance serves a
    whole run: it keeps the loaded evaluate modules and the last confusion matrix.
    """

    def __init__(self, options: EvalOptions | None = None) -> None:
        self.options = options if options is not None else EvalOptions()
        self.modules: list[_LoadedEvaluate] = []
        self.confusion_matrix: np.ndarray | None = None  # [C, C] of the last published evaluation

    def load_modules(self) -> None:
        """Load the ``evaluate`` modules (otherwise the first evaluation does)."""
        self.modules = [_load_evaluate(spec) for spec in self.options.evaluate]

    def run(self, runner, name: str | None = None) -> dict[str, Any]:
        """:meth:`compute`, then :meth:`publish`; returns the metrics."""
        return self.publish(runner, self.compute(runner), name)

    def compute(self, runner) -> EvalResult:
        """Fire ``before_val``, predict this rank's share of the validation split and reduce
        every rank's totals into the exact metrics. Publishes nothing."""
        from hooktrain.evaluation.metrics import summarize

        runner.call_hooks("before_val")
        if not self.modules and self.options.evaluate:
            self.load_modules()
        samples: list[dict[str, Any]] = []
        with runner.whole_model() as model:  # under FSDP, a plain copy with the gathered weights
            totals = self._predict_totals(runner, model, samples)
        options = self.options
        summary = summarize(totals.areas, options.metrics, beta=options.beta, nan_to_num=options.nan_to_num)
        metrics: dict[str, Any] = dict(summary.scalars)
        if runner.recipe.data.binary:
            metrics.update(_foreground_scalars(summary.per_class))
        metrics.update(totals.losses)
        for module in self.modules:
            metrics.update(self._compute_evaluate(runner, module))
        return EvalResult(metrics, summary.per_class, totals.confusion, totals.num_images,
                          totals.num_out_of_range, samples)  # fmt: skip

    def publish(self, runner, result: EvalResult, name: str | None = None) -> dict[str, Any]:
        """Put ``result`` in ``runner.state.metrics``, write the confusion files (named after
        ``name``, default ``iter_<N>``) and log the per-class table on the main process, fire
        ``after_val``, then ``runner.log`` everything with a ``val/`` prefix. Returns the metrics."""
        from hooktrain.evaluation.confusion import write_confusion_files
        from hooktrain.evaluation.metrics import format_table, top_confusions

        data = runner.recipe.data
        metrics = result.metrics
        runner.state.metrics = metrics
        logged: dict[str, Any] = {f"val/{k}": v for k, v in metrics.items()}
        notes = {}
        if result.confusion is not None:
            self.confusion_matrix = result.confusion
            notes["Top confusion"] = top_confusions(result.confusion, data.names)
            if runner.accelerator.is_main_process:
                logged["val/confusion_matrix"] = write_confusion_files(
                    result.confusion, data.names, runner.work_dir, name or f"iter_{runner.state.iter}"
                )
        if runner.accelerator.is_main_process:
            logger.info(
                "validation at iter %d on %d images:\n%s",
                runner.state.iter, result.num_images, format_table(result.per_class, data.names, notes),
            )  # fmt: skip
        if result.num_out_of_range:
            logger.warning(
                "validation: %d pixels had labels outside [0, %d) and were not scored",
                result.num_out_of_range, data.num_labels,
            )  # fmt: skip
        runner.call_hooks("after_val", metrics)
        logged["val/per_class"] = {key: values.tolist() for key, values in result.per_class.items()}
        if result.samples:
            logged["val/samples"] = result.samples
        runner.log(logged)
        return metrics

    def _predict_totals(self, runner, model, samples: list[dict[str, Any]]) -> _Totals:
        """Predict this rank's share of the validation split and reduce the counts (and loss
        sums) of every rank: exact totals on every rank. Appends the main process's first
        images to ``samples``."""
        import torch

        from hooktrain.data import build_val_loader
        from hooktrain.evaluation.metrics import Areas, confusion_counts, intersect_and_union
        from hooktrain.models.inference import predicted_labels

        options = self.options
        accelerator = runner.accelerator
        device = accelerator.device
        data = runner.recipe.data
        num_classes = data.num_labels  # binary: background and foreground are both scored
        counts = (
            torch.zeros((num_classes + 2, num_classes + 1), dtype=torch.int64, device=device)
            if options.confusion
            else Areas.zeros(num_classes, device=device).pack()
        )
        terms = model.decode_loss.term_names if options.loss else []
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
                    logits = predict_batch(model, batch, device)
                    for i, image_logits in enumerate(logits):
                        height, width = batch["ori_shapes"][i]
                        label = batch["mask"][i, :height, :width].to(device)
                        pred = predicted_labels(image_logits, model.inference)
                        if len(samples) < options.num_samples and accelerator.is_main_process:
                            samples.append(_sample(batch, i, pred, data))
                        if options.confusion:
                            counts += confusion_counts(pred, label, num_classes, data.ignore_index)
                        else:
                            counts += intersect_and_union(pred, label, num_classes, data.ignore_index).pack()
                        if terms:
                            loss_sums += _image_loss(model, image_logits, label, terms)
                        for module in self.modules:
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
        if options.confusion:
            extended = packed[:-1].reshape(num_classes + 2, num_classes + 1)
            return _Totals.from_confusion(extended, num_images, losses)
        return _Totals(Areas.unpack(packed[:-1]), None, num_images, losses)

    def _flush_pending(self, single_process: bool) -> None:
        """Hand the batch's predictions to each evaluate module: straight to ``add_batch``
        (which spills them to disk) in one process; kept until the end-of-pass gather in
        several, because ranks see different numbers of batches."""
        for module in self.modules:
            if module.pending:
                preds, labels = (list(x) for x in zip(*module.pending, strict=True))
                module.pending.clear()
                if single_process:
                    module.metric.add_batch(predictions=preds, references=labels)
                else:
                    module.local_batches.append((preds, labels))

    def _compute_evaluate(self, runner, module: _LoadedEvaluate) -> dict[str, Any]:
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


def check_val_data(data, *, world_size: int = 1) -> None:
    """Decode and check the first example of each validation shard (a folder source is one
    shard) as the evaluation will, so a bad mask or image in the validation split stops the
    run before its first iteration rather than at its first evaluation."""
    from hooktrain.data.reading import check_first_examples
    from hooktrain.data.retry import Retries
    from hooktrain.data.transforms import ValTransform
    from hooktrain.data.val import val_base
    from hooktrain.recipe.data import FolderSource

    if data.val is None:
        return  # nothing to check (the eval hook's check_recipe refuses such a recipe)
    start = time.perf_counter()
    base = val_base(data)
    transform = ValTransform(data.val.pipeline, mean=data.mean, std=data.std)
    num_shards = 1 if isinstance(data.val.source, FolderSource) else None
    retries = Retries.for_source(data.val.source, data.retry_budget_s, "data.val.source")
    checked = check_first_examples(data, base, transform, num_shards=num_shards, world_size=world_size,
                                   retries=retries)  # fmt: skip
    logger.info("eval hook: checked the first example of %d validation shard(s) in %.2fs",
                checked, time.perf_counter() - start)  # fmt: skip


def predict_batch(model, batch: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
    """Per-image scores at the original size of a validation batch; with
    ``model.inference.scales`` (TTA) the multi-scale test of each image, one view at a time
    (see ``hooktrain.models.inference``)."""
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

    from hooktrain.data.preview import preview

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
