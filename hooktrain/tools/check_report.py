"""The report of ``hooktrain data check``: what the examples hold, as text.

:func:`format_report` lays out the :class:`~hooktrain.tools.check_stats.DataStats` that
:func:`hooktrain.tools.check.scan` counted (columns, sizes, formats, raw mask values, pixels
and images per class, class weights) followed by the findings of
:func:`~hooktrain.tools.check_findings.diagnose` and the result line.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from hooktrain.tools.check_findings import CLASS_WEIGHT_FORMULA, class_weight_options, class_weights
from hooktrain.tools.check_stats import DataStats, Finding, label_steps

__all__ = ["format_report"]


def format_report(stats: DataStats, recipe, findings: list[Finding], *, where: str,
                  source_type: str, recipe_arg: str) -> str:  # fmt: skip
    """The report as text: columns, images, masks, values, classes, weights, findings."""
    import shlex
    import textwrap

    data = recipe.data
    lines = [f"data check of {where} ({source_type}) in {recipe_arg}: {stats.read} examples read, "
             f"{stats.decoded} decoded, {len(stats.corrupt)} corrupt", ""]  # fmt: skip
    lines += ["Columns"] + [f"  {name:<20} {kind}" for name, kind in stats.columns.items()]
    lines += ["", "Images", *_format_lines(stats.image_formats), *_kind_lines(stats.image_kinds),
              _size_line(stats.image_sizes)]  # fmt: skip
    lines += ["", "Masks", *_format_lines(stats.mask_formats), _size_line(stats.mask_sizes)]
    if stats.colour_masks:
        lines.append(f"  colour masks  {len(stats.colour_masks)} ({len(stats.colours)} colours)")
    if stats.raw_pixels:
        lines += ["", *_raw_histogram(stats)]
    if stats.class_pixels.sum():
        # Weights from class counts that a problem below will change would mislead.
        weights = None if data.binary or any(f.changes_classes for f in findings) else class_weights(stats)
        lines += ["", *_class_table(stats, data, weights), ""]
        if data.binary:
            lines.append("Class weights: binary masks take one foreground weight (BCE pos_weight), "
                         "not per-class weights")  # fmt: skip
        elif weights is None:
            lines.append("Class weights: not computed; fix the problems that change the class "
                         "counts first, then check again")  # fmt: skip
        elif not hasattr(recipe.model.decode_head, "losses"):
            lines.append(f"Class weights: a {recipe.model.decode_head.type} decode head classifies masks and takes "
                         "no per-class weights (only model.decode_head.loss.no_object_weight)")  # fmt: skip
        else:
            options = class_weight_options(weights, recipe.model)
            lines += [textwrap.fill(f"Class weights by {CLASS_WEIGHT_FORMULA}. To use them:",
                                    width=100, break_on_hyphens=False),
                      "  --cfg-options " + " ".join(shlex.quote(o) for o in options)]  # fmt: skip
    lines += ["", "Findings" if findings else "Findings: none"]
    for f in findings:
        label = "  PROBLEM  " if f.problem else "  note     "
        lines.append(textwrap.fill(f.detail, width=100, initial_indent=label,
                                   subsequent_indent=" " * len(label), break_long_words=False,
                                   break_on_hyphens=False))  # fmt: skip
        if f.command:
            lines.append(" " * len(label) + f.command)
        for when, command in f.fixes:  # one per reading: the label, the line indented below
            lines += [" " * len(label) + when, " " * (len(label) + 2) + command]
    problems = sum(f.problem for f in findings)
    if problems:
        result = f"{problems} problem(s); with this recipe training would stop or learn wrongly"
    else:
        result = f"no problems; the recipe would train on these {stats.read} examples"
    lines += ["", f"Result: {result}"]
    return "\n".join(lines) + "\n"


def _format_lines(formats: Counter) -> list[str]:
    return [f"  stored as     {fmt}: {n}" for fmt, n in formats.most_common()]


def _kind_lines(kinds: Counter) -> list[str]:
    """The images' channels and dtype as decoded, e.g. ``4 channels, uint16: 200``."""
    return [f"  decoded as    {kind}: {n}" for kind, n in kinds.most_common()]


def _size_line(sizes: Counter) -> str:
    if not sizes:
        return "  size          -"
    (h, w), n = sizes.most_common(1)[0]
    if len(sizes) == 1:
        return f"  size (h x w)  all {h} x {w}"
    hs, ws = [s[0] for s in sizes], [s[1] for s in sizes]
    return (f"  size (h x w)  height {min(hs)}..{max(hs)}, width {min(ws)}..{max(ws)}, "
            f"{len(sizes)} sizes, most common {h} x {w} ({n} of {sizes.total()})")  # fmt: skip


def _raw_histogram(stats: DataStats) -> list[str]:
    total = sum(stats.raw_pixels.values())
    values = sorted(stats.raw_pixels)
    lines = [f"Raw mask values: {values[0]}..{values[-1]}, {len(values)} distinct "
             "(value: share of pixels, images containing it)"]  # fmt: skip
    cells = [f"{v:>5}: {stats.raw_pixels[v] / total:7.2%} {stats.raw_images[v]:>5}" for v in values]
    for start in range(0, len(cells), 4):
        lines.append("  " + "   ".join(cells[start : start + 4]))
    return lines


def _class_table(stats: DataStats, data, weights: np.ndarray | None) -> list[str]:
    steps = label_steps(data)
    how = f"after {' and '.join(steps)}" if steps else "as stored"
    names = data.names
    width = max(12, *(len(n) for n in names))
    labelled = stats.class_pixels.sum()
    count = "binary: background and foreground" if data.binary else f"{data.num_classes} classes"
    lines = [f"Classes ({how}; {count}, ignore_index {data.ignore_index})",
             f"  {'class':>5}  {'name':<{width}}  {'pixels':>13}  {'share':>7}  {'images':>6}"
             + ("  weight" if weights is not None else "")]  # fmt: skip
    for c, name in enumerate(names):
        lines.append(
            f"  {c:>5}  {name:<{width}}  {stats.class_pixels[c]:>13,}  "
            f"{stats.class_pixels[c] / labelled:7.2%}  {stats.class_images[c]:>6}"
            + (f"  {weights[c]:.4g}" if weights is not None else "")
        )
    total = max(stats.total_pixels, 1)
    rows = [(f"ignored ({data.ignore_index})", stats.ignored_pixels)]
    if stats.out_of_range:
        rows.append(("out of range", stats.out_of_range.total()))
    for label, pixels in rows:
        lines.append(f"  {'':>5}  {label:<{width}}  {pixels:>13,}  {pixels / total:7.2%}  "
                     "of all pixels")  # fmt: skip
    return lines
