"""``hooktrain plot``: curves from runs' ``metrics.jsonl``, several runs overlaid, one panel per key.

Replaces MMSegmentation's ``tools/analysis_tools/analyze_logs.py``. The history is written by
the logger hook (``hooktrain_plugins/history.py``): one JSON object per logged step, ``{"iter": N,
"train/loss": ..., "val/mIoU": ..., ...}``, with ``null`` for NaN.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hooktrain.checkpoint.layout import HISTORY_FILE
from hooktrain.errors import UserError, did_you_mean

PANEL_INCHES = (5.0, 3.5)  # width, height of one panel
LEGEND_INCHES = 0.5  # the row above the panels holding the runs' legend
MAX_COLUMNS = 3
DPI = 100


def plot_runs(
    work_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    log_scale: bool = False,
) -> Path:
    """Plot the history of each work dir into the PNG ``out`` and return its path.

    One panel per key (default: :func:`default_keys`), x = iteration, every run overlaid in
    its own colour (C0, C1, ... of matplotlib's cycle) and named in a legend above the panels.
    A key missing from some runs is drawn for the runs that have it. With ``log_scale`` the y
    axes are logarithmic (non-positive values are masked; a panel with no positive value stays
    linear). Raises ``UserError`` for a bad ``out``, a work dir without history or an unknown key.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is written as PNG; give a file name ending in .png")
    paths = [Path(p) for p in work_dirs]
    histories = [read_history(p) for p in paths]
    available = list(dict.fromkeys(k for records in histories for k in scalar_keys(records)))
    keys = _check_keys(keys, histories, available) if keys else default_keys(available)
    if not keys:
        raise UserError(
            f"no loss, learning rate or validation metric in {', '.join(map(str, paths))}; "
            f"choose keys with --keys (available: {', '.join(available)})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _draw(keys, run_labels(paths), histories, log_scale, out)
    return out


def read_history(work_dir: Path) -> list[dict[str, Any]]:
    """The records of ``work_dir/metrics.jsonl`` in order; a half-written last line (a run
    still writing, or killed mid-write) is left out."""
    path = work_dir / HISTORY_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: is this a hooktrain work dir? Pass the --work-dir of a run trained "
            "with the logger hook (it writes metrics.jsonl there)"
        )
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not JSON: fix or delete that line") from None
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    if not records:
        raise UserError(
            f"{path} has no logged steps yet: wait for the run's first log (the logger hook's "
            "interval) or pass another work dir"
        )
    return records


def scalar_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose every value is a number or null (NaN), in order of first appearance;
    lists and dicts (``val/per_class``), strings and ``iter`` are left out."""
    seen: dict[str, bool] = {}
    for record in records:
        for key, value in record.items():
            seen[key] = seen.get(key, True) and _is_scalar(value)
    return [key for key, scalar in seen.items() if scalar and key != "iter"]


def default_keys(available: Sequence[str]) -> list[str]:
    """The panels without ``--keys``: ``train/loss`` and the other train loss terms, the
    learning rate, then the validation metrics and the validation loss terms."""
    train_losses = [k for k in available if k.startswith("train/") and "loss" in k]
    train_losses.sort(key=lambda k: k != "train/loss")
    lr = [k for k in available if k == "train/lr"]
    val = [k for k in available if k.startswith("val/")]
    val.sort(key=lambda k: "loss" in k)
    return train_losses + lr + val


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Legend labels: each work dir's name, with as many parent dirs as it takes to tell runs
    of the same name apart (``a/run``, ``b/run``); the same dir given twice gets ``#2``."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = [str(Path(*p[-d:])) for p, d in zip(parts, depth, strict=True)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    return [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


def grid_shape(num_panels: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: up to ``MAX_COLUMNS`` panels a row, and 4 panels as
    2 x 2 rather than 3 + 1."""
    columns = 2 if num_panels == 4 else min(num_panels, MAX_COLUMNS)
    return math.ceil(num_panels / columns), columns


def _is_scalar(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _check_keys(keys: Sequence[str], histories: list[list[dict]], available: list[str]) -> list[str]:
    """``keys`` without repeats, each plottable in at least one run."""
    for key in keys:
        if key in available:
            continue
        if any(key in record for records in histories for record in records):
            raise UserError(f"--keys {key}: its values are not numbers; choose from {', '.join(available)}")
        raise UserError(
            f"--keys {key}: no run has this key{did_you_mean(key, available)}; available: {', '.join(available)}"
        )
    return list(dict.fromkeys(keys))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The iterations where ``key`` was logged and its values (NaN for null, a gap in the line)."""
    points = [(r["iter"], math.nan if r[key] is None else float(r[key])) for r in records if key in r]
    return [x for x, _ in points], [y for _, y in points]


def _draw(keys: list[str], labels: list[str], histories: list[list[dict]], log_scale: bool, out: Path) -> None:
    """Render the panels with matplotlib's Agg canvas (no window) and write ``out`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows, columns = grid_shape(len(keys))
    size = (columns * PANEL_INCHES[0], rows * PANEL_INCHES[1] + LEGEND_INCHES)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches the Agg canvas: no GUI backend
    styles = [{"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]} for i in range(len(labels))]
    # Every panel spans the same iterations, so a validation curve lines up with the loss above it.
    iterations = [r["iter"] for records in histories for r in records]
    margin = max(1, (max(iterations) - min(iterations)) * 0.03)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        positive = False
        for records, style in zip(histories, styles, strict=True):
            xs, ys = _series(records, key)
            if xs:
                axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, **style)
                positive = positive or any(y > 0 for y in ys)
        title = key
        if log_scale and positive:
            axes.set_yscale("log", nonpositive="mask")
        elif log_scale:
            title += " (linear: no positive values)"
        axes.set_title(title)
        axes.set_xlabel("iter")
        axes.set_xlim(min(iterations) - margin, max(iterations) + margin)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    handles = [Line2D([], [], **style) for style in styles]
    figure.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4), frameon=False)
    partial = out.with_name(f".{out.name}.partial.png")
    figure.savefig(partial, format="png")
    partial.replace(out)
