"""Segmentation metrics with MMSegmentation 0.x semantics.

Evaluation is two steps, so that only a few hundred integers ever cross ranks:

1. :func:`intersect_and_union` reduces each prediction to four per-class pixel counts, an
   :class:`Areas`, on the device the prediction lives on. Areas add up exactly (int64), so
   the sum over a validation set does not depend on the order or on how images were split
   across processes.
2. :func:`summarize` turns the summed areas into ``aAcc`` / ``mIoU`` / ``mAcc`` / ``mDice`` /
   ``mFscore`` / ``mPrecision`` / ``mRecall`` and per-class values, in float64, like mmseg's
   ``eval_metrics``; :func:`format_table` prints the per-class table.

Typical use in an eval hook::

    total = Areas.zeros(num_classes, device=accelerator.device)
    for pred, label in predictions:
        total += intersect_and_union(pred, label, num_classes)
    packed = accelerator.reduce(total.pack(), reduction="sum")   # one all-reduce
    total = Areas.unpack(packed)
    if int(total.num_out_of_range):
        warn(...)
    summary = summarize(total)
    runner.log({f"val/{k}": v for k, v in summary.scalars.items()})
    print(format_table(summary.per_class, class_names))

Out-of-range values (neither in ``[0, num_classes)`` nor the ignore index):

- a *label* out of range excludes the whole pixel from all four areas and is counted in
  ``Areas.num_out_of_range`` so the caller can warn. (mmseg drops it from the label area but
  still counts its prediction in the pred area; a corrupt label should not move metrics.)
- a *prediction* out of range is dropped from the pred area only, as mmseg's ``histc`` does:
  the pixel still counts in its label's area, so it lowers that class's IoU and accuracy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Areas", "Summary", "intersect_and_union", "confusion_counts", "areas_from_confusion", "top_confusions",
    "summarize", "format_table", "METRICS",
]  # fmt: skip

# Metric name -> per-class keys it produces, in mmseg's order.
METRICS: dict[str, tuple[str, ...]] = {
    "mIoU": ("IoU", "Acc"),
    "mDice": ("Dice", "Acc"),
    "mFscore": ("Fscore", "Precision", "Recall"),
}


@dataclass(frozen=True)
class Areas:
    """Per-class pixel counts: four int64 tensors of shape ``[num_classes]`` on one device.

    ``num_out_of_range`` is a 0-dim int64 tensor (kept on the device so that accumulating
    never forces a host sync) counting pixels whose label was out of range.
    """

    intersect: torch.Tensor
    union: torch.Tensor
    pred: torch.Tensor
    label: torch.Tensor
    num_out_of_range: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.intersect.numel()

    @classmethod
    def zeros(cls, num_classes: int, device: torch.device | str | None = None) -> Areas:
        """Empty areas, the identity for ``+``."""
        return cls.unpack(torch.zeros(4 * num_classes + 1, dtype=torch.int64, device=device))

    def __add__(self, other: Areas) -> Areas:
        if not isinstance(other, Areas):
            return NotImplemented
        return Areas.unpack(self.pack() + other.pack())

    def __radd__(self, other: object) -> Areas:
        # Lets the builtin sum() start from 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def as_tensor(self) -> torch.Tensor:
        """Stack into a ``[4, num_classes]`` int64 tensor (intersect, union, pred, label)."""
        return torch.stack([self.intersect, self.union, self.pred, self.label])

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, num_out_of_range: int | torch.Tensor = 0) -> Areas:
        """Inverse of :meth:`as_tensor`."""
        tensor = torch.as_tensor(tensor)
        if tensor.dim() != 2 or tensor.shape[0] != 4:
            raise ValueError(f"expected a [4, num_classes] tensor, got shape {tuple(tensor.shape)}")
        tensor = tensor.to(torch.int64)
        count = torch.as_tensor(num_out_of_range, dtype=torch.int64, device=tensor.device)
        return cls(tensor[0], tensor[1], tensor[2], tensor[3], count.reshape(()))

    def pack(self) -> torch.Tensor:
        """Flatten everything, out-of-range count included, into one 1-D int64 tensor of
        length ``4 * num_classes + 1``: a single all-reduce (sum) then carries it all."""
        return torch.cat([self.as_tensor().reshape(-1), self.num_out_of_range.reshape(1)])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> Areas:
        """Inverse of :meth:`pack`."""
        packed = torch.as_tensor(packed)
        if packed.dim() != 1 or (packed.numel() - 1) % 4:
            raise ValueError(f"expected a 1-D tensor of length 4*C+1, got shape {tuple(packed.shape)}")
        return cls.from_tensor(packed[:-1].reshape(4, -1), packed[-1])


def intersect_and_union(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int | None = 255,
) -> Areas:
    """Per-class areas of one prediction (or a batch: any shape, ``pred`` and ``label`` alike).

    Args:
        pred: integer class map, e.g. ``logits.argmax(1)``.
        label: integer ground truth of the same shape.
        num_classes: number of scored classes ``C``; valid values are ``0..C-1``.
        ignore_index: label value excluded from evaluation, or ``None`` for none.

    Returns:
        :class:`Areas` on ``pred``'s device. Out-of-range values are handled as described in
        the module docstring.

    All four areas come from one ``torch.bincount``: see :func:`confusion_counts`.
    """
    return areas_from_confusion(confusion_counts(pred, label, num_classes, ignore_index))


def confusion_counts(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """The extended confusion matrix of one prediction (or a batch), from one ``torch.bincount``.

    Returns an int64 ``[C+2, C+1]`` tensor on ``pred``'s device: rows are ground-truth classes
    ``0..C-1``, then one row for ignored pixels and one for out-of-range labels; columns are
    predicted classes ``0..C-1``, then one column for out-of-range predictions. Its top-left
    ``[C, C]`` block is the confusion matrix; counts add up exactly across images and ranks.
    """
    pred, label = torch.as_tensor(pred), torch.as_tensor(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}")
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError(f"expected integer class maps, got {pred.dtype} and {label.dtype}")
    label = label.to(pred.device).reshape(-1).long()
    pred = pred.reshape(-1).long()
    C = int(num_classes)
    ignored_row, bad_row = C, C + 1

    row = torch.where((label >= 0) & (label < C), label, bad_row)
    if ignore_index is not None:
        row = row.masked_fill_(label == ignore_index, ignored_row)
    col = torch.where((pred >= 0) & (pred < C), pred, C)
    counts = torch.bincount(row.mul_(C + 1).add_(col), minlength=(C + 2) * (C + 1))
    return counts.view(C + 2, C + 1)


def areas_from_confusion(counts: torch.Tensor) -> Areas:
    """The four per-class areas of an extended confusion matrix (:func:`confusion_counts`,
    or a sum of them)."""
    C = counts.shape[1] - 1
    scored = counts[:C]
    area_intersect = torch.diagonal(scored[:, :C]).clone()
    area_pred = scored[:, :C].sum(0)
    area_label = scored.sum(1)
    area_union = area_pred + area_label - area_intersect
    return Areas(area_intersect, area_union, area_pred, area_label, counts[C + 1].sum())


def top_confusions(matrix: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> list[str]:
    """For each ground-truth class (row of a ``[C, C]`` confusion matrix), the class its
    pixels are most often predicted as instead, with the share of the row: ``"building 12.0%"``;
    ``""`` for a class with no pixels or no confusion."""
    matrix = np.asarray(matrix, dtype=np.float64)
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    totals = matrix.sum(1)
    cells = []
    for row, total in zip(off_diagonal, totals, strict=True):
        other = int(row.argmax()) if row.size else 0
        cells.append(f"{class_names[other]} {100 * row[other] / total:.1f}%" if row.size and row[other] else "")
    return cells


@dataclass(frozen=True)
class Summary:
    """What :func:`summarize` returns.

    Attributes:
        scalars: ``{"aAcc": ..., "mIoU": ..., "mAcc": ..., ...}`` as Python floats, fractions in
            ``[0, 1]`` (NaN when nothing was scored). Ready to log as ``val/<name>``.
        per_class: ``{"IoU": array, "Acc": array, ...}``, float64 arrays of shape ``[C]``,
            in mmseg's key order; NaN for a class whose denominator is 0.
    """

    scalars: dict[str, float]
    per_class: dict[str, np.ndarray]


def summarize(
    areas: Areas | torch.Tensor | np.ndarray,
    metrics: Sequence[str] | str = ("mIoU", "mDice", "mFscore"),
    beta: float = 1,
    nan_to_num: float | None = None,
) -> Summary:
    """Metrics from summed areas, with mmseg 0.x ``total_area_to_metrics`` semantics.

    Args:
        areas: summed :class:`Areas`, or their ``[4, C]`` tensor (see :meth:`Areas.as_tensor`).
        metrics: any of ``"mIoU"`` (IoU, Acc), ``"mDice"`` (Dice, Acc), ``"mFscore"``
            (Fscore, Precision, Recall). ``aAcc`` is always included.
        beta: the F-score's beta.
        nan_to_num: if given, NaNs (per class and ``aAcc``) are replaced by it *before* the
            means are taken, so those classes then count in the means, as in mmseg.

    Returns:
        A :class:`Summary`. Each per-class key ``K`` also yields the scalar ``"m" + K``, the
        mean over classes ignoring NaN (a class absent from both prediction and ground truth
        has NaN IoU and is left out of ``mIoU``).

    Raises:
        ValueError: for an unknown metric name.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {list(METRICS)}")
    counts = areas.as_tensor() if isinstance(areas, Areas) else torch.as_tensor(areas)
    # int64 -> float64 is exact below 2**53 pixels, so summaries are order-independent.
    intersect, union, pred, label = counts.detach().cpu().to(torch.float64).numpy()

    with np.errstate(divide="ignore", invalid="ignore"):
        values: dict[str, np.ndarray] = {"aAcc": np.float64(intersect.sum() / label.sum())}
        for metric in metrics:
            if metric == "mIoU":
                values["IoU"] = intersect / union
                values["Acc"] = intersect / label
            elif metric == "mDice":
                values["Dice"] = 2 * intersect / (pred + label)
                values["Acc"] = intersect / label
            else:
                precision, recall = intersect / pred, intersect / label
                b2 = beta**2
                values["Fscore"] = (1 + b2) * precision * recall / (b2 * precision + recall)
                values["Precision"] = precision
                values["Recall"] = recall
    if nan_to_num is not None:
        values = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in values.items()}

    scalars = {"aAcc": float(values.pop("aAcc"))}
    scalars.update({f"m{key}": _nanmean(v) for key, v in values.items()})
    return Summary(scalars=scalars, per_class=values)


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` that returns NaN for an all-NaN or empty input without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if values.size else math.nan


def format_table(
    per_class: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None = None,
    notes: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A plain-text per-class table in percent with 2 decimals, plus a ``mean`` row.

    Columns follow ``per_class``'s order (e.g. ``Summary.per_class``); rows are classes, named
    by ``class_names`` or by index. NaN prints as ``nan``; the mean row skips NaN like the
    ``m*`` scalars do. ``notes`` adds left-aligned text columns after them, one string per class
    (e.g. ``{"Top confusion": top_confusions(...)}``).
    """
    keys = list(per_class)
    columns = [np.asarray(per_class[k], dtype=np.float64) for k in keys]
    num_classes = len(columns[0]) if columns else len(class_names or ())
    if any(len(c) != num_classes for c in columns):
        raise ValueError("per-class arrays differ in length")
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    def pct(x: float) -> str:
        return "nan" if math.isnan(x) else f"{100 * x:.2f}"

    notes = dict(notes or {})
    if any(len(n) != num_classes for n in notes.values()):
        raise ValueError("notes and per-class arrays differ in length")
    rows = [["Class", *keys, *notes]]
    rows += [
        [str(name), *(pct(c[i]) for c in columns), *(n[i] for n in notes.values())]
        for i, name in enumerate(class_names)
    ]
    footer = ["mean", *(pct(_nanmean(c)) for c in columns), *("" for _ in notes)]
    widths = [max(len(r[j]) for r in [*rows, footer]) for j in range(len(rows[0]))]
    num_numeric = 1 + len(keys)

    def line(cells: list[str]) -> str:
        first, *numbers = cells[:num_numeric]
        texts = cells[num_numeric:]
        parts = [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(numbers, widths[1:num_numeric]))]
        parts += [c.ljust(w) for c, w in zip(texts, widths[num_numeric:])]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:]), rule, line(footer)])
