"""The confusion matrix as files: counts as CSV, and a row-normalised heatmap with class names.

Rows are ground-truth classes, columns predicted classes; ignored pixels are not counted. The
evaluation (the eval hook's and ``hooktrain test``'s) writes both (``<work_dir>/confusion/``,
:func:`write_confusion_files`) and logs the heatmap to the dashboards.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hooktrain.checkpoint.files import atomic_path, write_atomically

CORNER = "ground truth \\ prediction"


def write_confusion_csv(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Pixel counts, one row per ground-truth class, one column per predicted class, with the
    class names as the first row and the first column. Written atomically."""
    path = Path(path)
    with atomic_path(path) as partial, open(partial, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([CORNER, *class_names])
        for name, row in zip(class_names, np.asarray(matrix, dtype=np.int64), strict=True):
            writer.writerow([name, *row.tolist()])
    return path


def read_confusion_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Inverse of :func:`write_confusion_csv`: the ``[C, C]`` int64 counts and the class names."""
    with open(path, newline="") as file:
        header, *rows = list(csv.reader(file))
    names = header[1:]
    return np.asarray([[int(v) for v in row[1:]] for row in rows], dtype=np.int64).reshape(len(names), -1), names


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the share of a class's pixels predicted as each class);
    rows of absent classes stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def render_heatmap(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> np.ndarray:
    """The row-normalised matrix as an RGB uint8 image ``[H, W, 3]``: a heatmap (0 white to 1
    dark blue) with the class names on both axes and, up to 20 classes, each cell's percentage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shares = row_normalised(matrix)
    num_classes = len(class_names)
    side = min(max(4.0, 0.3 * num_classes + 2.5), 30.0)
    font = float(np.clip(220 / max(num_classes, 1), 3, 9))
    figure = Figure(figsize=(side + 1, side), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="share of the ground-truth class")
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=font)
    axes.set_yticks(ticks, labels=list(class_names), fontsize=font)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    if title:
        axes.set_title(title)
    if num_classes <= 20:
        for (row, col), share in np.ndenumerate(shares):
            if share >= 0.005:
                colour = "white" if share > 0.5 else "black"
                axes.text(col, row, f"{100 * share:.0f}", ha="center", va="center", fontsize=font, color=colour)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_heatmap(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB image from :func:`render_heatmap` as a PNG, atomically."""
    import cv2

    path = Path(path)
    encoded, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not encoded:
        raise ValueError(f"OpenCV could not encode the heatmap for {path}")
    write_atomically(path, png.tobytes())
    return path


def write_confusion_files(
    matrix: np.ndarray, class_names: Sequence[str], work_dir: str | os.PathLike, name: str
) -> np.ndarray:
    """Write ``<work_dir>/confusion/confusion_<name>.csv`` and ``.png``, as every evaluation
    does (``name``: ``iter_<N>``, or ``test``); returns the heatmap (RGB) for the dashboards."""
    directory = Path(work_dir) / "confusion"
    directory.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(matrix, class_names, directory / f"confusion_{name}.csv")
    heatmap = render_heatmap(matrix, class_names, title=f"confusion, {name.replace('_', ' ')} (rows sum to 100%)")
    write_heatmap(heatmap, directory / f"confusion_{name}.png")
    return heatmap
