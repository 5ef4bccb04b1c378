"""Dashboards through Accelerate's tracker API: wandb and TensorBoard, on the main process.

The runner creates the ``Accelerator`` before any hook exists, so the trackers are built
here as ``accelerate.tracking`` objects and handed to it the way Accelerate takes custom
``GeneralTracker`` instances (``log_with`` + ``init_trackers``); ``accelerator.end_training()``
(called by the CLI) finishes them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from hooktrain.errors import UserError
from hooktrain.recipe.section import Section

if TYPE_CHECKING:
    from hooktrain.hooks import Runner

logger = logging.getLogger("hooktrain")

TrackerName = Literal["wandb", "tensorboard"]
STEP_METRIC = "iter"
TENSORBOARD_DIR = "tensorboard"
_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


class WandbOptions(Section):
    """Where the wandb run goes and what its summary keeps."""

    project: str = Field("hooktrain", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity (user or team); default: yours.")
    name: str | None = Field(None, description="Run name; default: the work dir's name.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    group: str | None = Field(None, description="Run group (e.g. one per sweep).")
    summary: dict[str, Literal["max", "min", "mean", "last"]] = Field(
        default_factory=lambda: {"val/mIoU": "max"},
        description="Summary statistic per metric (the run table shows these).",
    )


def check_installed(names: list[str]) -> None:
    """A clear error, on every rank alike, when a tracker's package is missing."""
    for name in names:
        module, package = _PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(
                f"logger hook: log_with includes {name} but it cannot be imported ({exc}); "
                f"pip install {package}, or remove {name} from log_with"
            ) from None


class Dashboards:
    """The run's trackers on the main process. Converts logged values for each tracker
    (scalars and pictures everywhere; tables and segmentation samples on wandb) and keeps
    wandb's steps moving forward."""

    def __init__(self, names: list[str], wandb_options: WandbOptions) -> None:
        self.names = names
        self.wandb_options = wandb_options
        self.run_id: str | None = None  # the wandb run's id, saved to resume the same run
        self._accelerator = None
        self._wandb_floor = 0  # wandb drops any log below the step it has reached
        self._class_labels: dict[int, str] = {}
        self._class_names: list[str] = []

    def start(self, runner: Runner, run_id: str | None, resume_iter: int | None) -> None:
        """Create the trackers and start them through the runner's Accelerator. ``run_id``
        continues that wandb run; ``resume_iter`` drops TensorBoard events logged after the
        checkpoint by an earlier process of the run."""
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        data = runner.recipe.data
        if data.binary:  # background and foreground
            self._class_names = data.names
        else:
            self._class_names = list(data.class_names or [str(i) for i in range(data.num_classes)])
        self._class_labels = dict(enumerate(self._class_names))
        self._class_labels.setdefault(data.ignore_index, "ignore")
        trackers = []
        if "tensorboard" in self.names:
            purge = {} if resume_iter is None else {"purge_step": resume_iter + 1}
            trackers.append(TensorBoardTracker(TENSORBOARD_DIR, runner.work_dir, **purge))
        if "wandb" in self.names:
            options = self.wandb_options
            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            trackers.append(WandBTracker(
                options.project, entity=options.entity, name=options.name or runner.work_dir.name,
                tags=options.tags, group=options.group, dir=str(runner.work_dir),
                config=runner.recipe.to_dict(), **resume,
            ))  # fmt: skip
        accelerator = self._accelerator = runner.accelerator
        accelerator.log_with = trackers
        try:
            accelerator.init_trackers(self.wandb_options.project)
        except Exception as exc:
            accelerator.trackers.clear()  # end_training() must not finish trackers never started
            _raise_start_error(exc)
        if "wandb" in self.names:
            self._setup_wandb_run(accelerator.get_tracker("wandb", unwrap=True))

    def _setup_wandb_run(self, run) -> None:
        self.run_id = run.id
        self._wandb_floor = run.step  # > 0 when an online run resumes
        run.define_metric(STEP_METRIC)
        for prefix in ("train/*", "val/*"):
            run.define_metric(prefix, step_metric=STEP_METRIC)
        for key, summary in self.wandb_options.summary.items():
            run.define_metric(key, step_metric=STEP_METRIC, summary=summary)

    def log(self, values: dict[str, Any], step: int) -> None:
        """Send ``values`` at ``step`` to every tracker in the form it understands."""
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in values.items()) if v is not None}
        if "tensorboard" in self.names:
            tensorboard = self._accelerator.get_tracker("tensorboard")
            if scalars:
                tensorboard.log(scalars, step=step)
            images = {k: v for k, v in values.items() if _is_image(v)}
            if images:
                tensorboard.log_images(images, step=step, dataformats="HWC")
        if "wandb" in self.names:
            if step < self._wandb_floor:
                logger.warning(
                    "logger: not sending %s at step %d to wandb: the run is already at step %d "
                    "and wandb would drop it silently", sorted(values), step, self._wandb_floor,
                )  # fmt: skip
                return
            payload = {STEP_METRIC: step, **scalars, **self._wandb_media(values)}
            self._accelerator.get_tracker("wandb").log(payload, step=step)
            self._wandb_floor = step

    def _wandb_media(self, values: dict[str, Any]) -> dict[str, Any]:
        """Per-class tables, segmentation samples and pictures (the confusion heatmap) as wandb
        objects."""
        import wandb

        media = {}
        for key, value in values.items():
            if _is_per_class(value, len(self._class_names)):
                columns = list(value)
                rows = [[name, *(value[c][i] for c in columns)]
                        for i, name in enumerate(self._class_names)]  # fmt: skip
                media[key] = wandb.Table(columns=["class", *columns], data=rows)
            elif _is_samples(value):
                media[key] = [self._wandb_image(sample, i) for i, sample in enumerate(value)]
            elif _is_image(value):
                media[key] = wandb.Image(value)
        return media

    def _wandb_image(self, sample: dict[str, Any], index: int):
        import numpy as np
        import wandb

        masks = {
            name: {"mask_data": np.asarray(sample[name]), "class_labels": self._class_labels}
            for name in ("prediction", "ground_truth")
            if name in sample
        }
        return wandb.Image(np.asarray(sample["image"]), masks=masks, caption=f"sample {index}")


def _scalar(value: Any) -> float | int | None:
    """A number a dashboard can plot, or None."""
    if hasattr(value, "ndim") and hasattr(value, "item"):  # a tensor or numpy value; no torch import
        return value.item() if value.ndim == 0 else None
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else None


def _is_per_class(value: Any, num_classes: int) -> bool:
    """``{"IoU": [C floats], "Acc": [...]}``, as the eval hook logs per-class metrics."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list | tuple) and len(v) == num_classes for v in value.values())
    )


def _is_samples(value: Any) -> bool:
    """``[{"image": HxWx3, "prediction": HxW, "ground_truth": HxW}, ...]`` (eval samples)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and "image" in v for v in value
    )


def _is_image(value: Any) -> bool:
    """An RGB picture, ``uint8 [H, W, 3]`` (the confusion heatmap); masks are 2-D."""
    return getattr(value, "ndim", 0) == 3 and value.shape[-1] == 3 and str(getattr(value, "dtype", "")) == "uint8"


def _raise_start_error(exc: Exception) -> None:
    """Turn a tracker that cannot start (no wandb login, no network) into one clear line."""
    try:
        import wandb.errors

        wandb_error = isinstance(exc, wandb.errors.Error)
    except ImportError:
        wandb_error = False
    if wandb_error:
        raise UserError(
            f"wandb could not start a run ({exc}); run `wandb login` (or set "
            "WANDB_API_KEY), or set WANDB_MODE=offline to log locally and `wandb sync` later"
        ) from None
    raise exc
