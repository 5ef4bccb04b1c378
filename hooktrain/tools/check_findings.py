"""The diagnosis of ``hooktrain data check``: what the counted examples mean for the recipe.

:func:`diagnose` turns the :class:`DataStats` that :func:`hooktrain.tools.check.scan` counted
into :class:`Finding` s. A finding is either a *problem* (training would stop, or would learn
wrong labels) or a *note*; each says what was seen, what it means and the fix, often with a
line to paste (``--cfg-options`` values, a ``hooktrain data convert --palette`` command).

The mask values' diagnoses, which weigh two readings of one pattern, are in
:mod:`hooktrain.tools.check_labels`; the shared types in :mod:`hooktrain.tools.check_stats`.

Class weights use median frequency balancing (Eigen & Fergus 2015, as in SegNet):
``w_c = median(f) / f_c`` with ``f_c`` = pixels of class ``c`` / labelled pixels of the images
that contain ``c`` (the median over the classes seen). Classes not seen get the largest weight
of those seen. See docs/data-check.md.

``hooktrain.tools.check`` (the scan) and ``hooktrain.tools.check_report`` (the text) import this
module; it imports neither.
"""

from __future__ import annotations

import numpy as np

from hooktrain.tools.check_labels import label_value_findings
from hooktrain.tools.check_stats import SHOWN, DataStats, Finding, label_steps

__all__ = ["CLASS_WEIGHT_FORMULA", "class_weight_options", "class_weights", "diagnose", "recipe_palette"]

CLASS_WEIGHT_FORMULA = (
    "median frequency balancing as in SegNet (Eigen & Fergus 2015): w_c = median(f) / f_c, where "
    "f_c = pixels of class c / labelled pixels of the images containing c; classes not seen get "
    "the largest weight"
)


# -- diagnosis ----------------------------------------------------------------------------


def diagnose(stats: DataStats, recipe, source=None, recipe_arg: str = "RECIPE") -> list[Finding]:
    """Findings about ``stats`` for ``recipe`` (its ``data`` and ``model`` sections), problems
    first. ``source`` (the checked source) and ``recipe_arg`` fill in the suggested commands."""
    findings: list[Finding] = []
    for check in (_nothing_read, _corrupt, _wrong_images, _photometric_depth, _bad_masks,
                  _size_mismatch, _colour_masks, _grey_rgb_masks, label_value_findings, _label_map_overlap,
                  _ignored_pixels, _class_weight_lengths, _absent_classes, _image_formats):  # fmt: skip
        findings.extend(check(stats, recipe, source, recipe_arg))
    return sorted(findings, key=lambda f: not f.problem)


def _ids(ids: list) -> str:
    """The first example ids, and how many there are when not all are shown."""
    shown = ", ".join(str(i) for i in ids[:SHOWN])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN else "")


def _nothing_read(stats, recipe, source, recipe_arg) -> list[Finding]:
    if stats.read:
        return []
    return [Finding(True, "the source yielded no examples",
                    "The source yielded no examples: check its files and split.")]  # fmt: skip


def _corrupt(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.corrupt:
        return []
    n, cap = len(stats.corrupt), recipe.data.max_corrupt
    listed = "; ".join(f"{i}: {m}" for i, m in stats.corrupt[:SHOWN])
    more = f"; ... ({n} in all)" if n > SHOWN else ""
    if n > cap:
        return [Finding(
            True, f"{n} examples cannot be decoded, more than data.max_corrupt={cap}: fix or "
            "remove them",
            f"{n} of {stats.read} examples cannot be decoded ({listed}{more}). Training skips "
            f"undecodable examples but stops after data.max_corrupt={cap} per process: fix or "
            "remove these files, or raise data.max_corrupt.",
        )]  # fmt: skip
    return [Finding(
        False, f"{n} corrupt examples",
        f"{n} of {stats.read} examples cannot be decoded ({listed}{more}). Training skips them "
        f"(at most data.max_corrupt={cap} per process); fix or remove them.",
    )]  # fmt: skip


def _wrong_images(stats, recipe, source, recipe_arg) -> list[Finding]:
    """Images that decode but not as ``data.in_channels`` channels of uint8 / uint16."""
    if not stats.wrong_images:
        return []
    n = len(stats.wrong_images)
    example, message = stats.wrong_images[0]
    fix = message.split("; ", 1)[1] if "; " in message else "fix the images or the recipe"
    return [Finding(
        True, f"{n} images do not fit data.in_channels={recipe.data.in_channels} (e.g. {example}): {fix}",
        f"{n} images decode but do not fit the recipe ({_ids([i for i, _ in stats.wrong_images])}); "
        f"training stops at the first one. The first says: {message}",
    )]  # fmt: skip


def _photometric_depth(stats, recipe, source, recipe_arg) -> list[Finding]:
    """16-bit training images with PhotoMetricDistortion on (8-bit RGB only)."""
    data = recipe.data
    wide = sum(n for kind, n in stats.image_kinds.items() if not kind.endswith("uint8"))
    if not wide or not data.train.pipeline.photometric or source is not data.train.source:
        return []
    return [Finding(
        True, f"{wide} images are 16-bit but data.train.pipeline.photometric is on: set photometric: false",
        f"{wide} of the images are 16-bit. mmseg's PhotoMetricDistortion works on 8-bit RGB, so "
        "training stops at the first one; set data.train.pipeline.photometric: false.",
        "--cfg-options data.train.pipeline.photometric=false",
    )]  # fmt: skip


def _bad_masks(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.bad_masks:
        return []
    n = len(stats.bad_masks)
    example, message = stats.bad_masks[0]
    return [Finding(
        True, f"{n} masks are not single-channel integer images (e.g. {example})",
        f"{n} masks decode but cannot be used ({_ids([i for i, _ in stats.bad_masks])}); "
        f"training stops at the first one. The first says: {message}",
    )]  # fmt: skip


def _size_mismatch(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.size_mismatch:
        return []
    n = len(stats.size_mismatch)
    example, (ih, iw), (mh, mw) = stats.size_mismatch[0]
    return [Finding(
        True, f"{n} masks differ in size from their images (e.g. {example})",
        f"{n} masks have another height and width than their image, e.g. {example}: image "
        f"{ih} x {iw}, mask {mh} x {mw} ({_ids([e[0] for e in stats.size_mismatch])}). "
        "Training stops at the first one: every mask must have its image's size.",
    )]  # fmt: skip


def _convert_command(source, recipe_arg: str, palette_arg: str) -> str:
    """The `hooktrain data convert --palette` line for ``source``: its folders and suffixes
    when ``data convert`` pairs them the same way (no split files), else placeholders."""
    from pathlib import Path
    from shlex import quote

    from hooktrain.recipe.data import FolderSource

    where = "FOLDER OUT"  # a parquet or Hub source: convert the folder it was made from
    plain = (
        isinstance(source, FolderSource)
        and source.split_file is None
        and source.recursive
        and not isinstance(source.annotations_dir, list)
    )
    if plain and source.images_dir and source.annotations_dir:
        root = Path(source.root or "")
        images, annotations = root / source.images_dir, root / source.annotations_dir
        where = f"{quote(str(images))} OUT --annotations {quote(str(annotations))}"
    elif plain and source.root:
        where = f"{quote(source.root)} OUT --split {quote(source.split)}"
    if plain and source.img_suffix is not None:
        where += f" --img-suffix {quote(source.img_suffix)}"
    if plain and source.seg_map_suffix != ".png":
        where += f" --seg-map-suffix {quote(source.seg_map_suffix)}"
    return f"hooktrain data convert {where} --palette {quote(palette_arg)}"


def _colour_masks(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.colour_masks:
        return []
    data = recipe.data
    n, k = len(stats.colour_masks), len(stats.colours)
    seen = (f"{n} of {stats.read} masks are RGB colour images ({k} distinct colours; the first "
            f"is {stats.colour_masks[0]}); training needs one class index per pixel.")  # fmt: skip
    mapped = ("The converted masks hold the class indices of the palette, so train them with "
              "reduce_zero_label: false and no label_map.")  # fmt: skip
    for colour, classes in recipe_palette(data).duplicates if data.palette else []:
        mapped += (f" data.palette gives {list(colour)} to classes {classes}: its pixels become "
                   f"class {classes[0]}.")  # fmt: skip
    if data.reduce_zero_label or data.label_map:
        mapped += f" This recipe sets {' and '.join(label_steps(data))}: turn it off."
    if data.palette is None:
        return [Finding(
            True, "the masks are RGB colour images and the recipe has no data.palette: convert "
            "them with hooktrain data convert --palette COLOURS",
            f"{seen} The recipe sets no data.palette to match them against. Convert them to "
            "index masks with --palette and a JSON/YAML list of [r, g, b] colours in class "
            f"order (or add data.palette to the recipe). {mapped}",
            _convert_command(source, recipe_arg, "COLOURS.json"),
            changes_classes=True,
        )]  # fmt: skip
    if not stats.unknown_colours:
        return [Finding(
            True, "the masks are RGB colour images whose colours all match data.palette: "
            f"convert them with hooktrain data convert --palette {recipe_arg}",
            f"{seen} Every colour matches data.palette, so `hooktrain data convert --palette` "
            f"converts them to index masks (the class table below shows what they hold). {mapped}",
            _convert_command(source, recipe_arg, recipe_arg),
        )]  # fmt: skip
    unknown = sorted(stats.unknown_colours, key=lambda c: -stats.unknown_colour_pixels[c])
    shown = ", ".join(
        f"{list(c)} ({stats.unknown_colour_pixels[c]} px, first at {stats.unknown_colours[c][0]} "
        f"x={stats.unknown_colours[c][1]} y={stats.unknown_colours[c][2]})"
        for c in unknown[:SHOWN]
    )
    return [Finding(
        True, f"the masks are RGB colour images and {len(unknown)} of their colours are not in "
        "data.palette: fix the palette, then convert them with hooktrain data convert --palette",
        f"{seen} {len(unknown)} colours are not in data.palette: {shown}. Fix data.palette (one "
        "[r, g, b] per class, in class order) or list every colour in a JSON/YAML file, then "
        f"convert the masks with --palette. {mapped}",
        _convert_command(source, recipe_arg, recipe_arg),
        changes_classes=True,
    )]  # fmt: skip


def _grey_rgb_masks(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.grey_rgb_masks:
        return []
    n = len(stats.grey_rgb_masks)
    return [Finding(
        True, f"{n} masks are 3-channel images with equal channels: save them as single-channel "
        "PNGs",
        f"{n} masks are greyscale saved as 3 channels ({_ids(stats.grey_rgb_masks)}); training "
        "needs single-channel masks. Save them as PNG mode L, e.g. with OpenCV "
        "cv2.imwrite(path, cv2.imread(path, cv2.IMREAD_GRAYSCALE)).",
        changes_classes=True,
    )]  # fmt: skip


def _label_map_overlap(stats, recipe, source, recipe_arg) -> list[Finding]:
    """Raw values that label_map leaves alone but that land on classes it also produces."""
    from hooktrain.data.labels import LabelMapper

    data = recipe.data
    if not data.label_map or not stats.raw_pixels:
        return []
    raw = np.array(sorted(stats.raw_pixels))
    shift = LabelMapper(data.num_classes, data.ignore_index, data.reduce_zero_label, mask_scale=data.mask_scale)
    shifted, _ = shift.map_values(raw)  # what label_map's keys are compared with
    targets = set(data.label_map.values()) - {data.ignore_index}
    through = [int(r) for r, s in zip(raw, shifted, strict=True)
               if s not in data.label_map and s != data.ignore_index and s in targets]  # fmt: skip
    if not through:
        return []
    return [Finding(
        False, "label_map leaves values that collide with its classes",
        f"Raw values {through[:SHOWN]} are not keys of data.label_map, so they pass through "
        "unchanged, onto classes that label_map also produces. If they are not those classes, "
        "map them too (e.g. to the ignore index).",
    )]  # fmt: skip


def _ignored_pixels(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.total_pixels:
        return []
    labelled = int(stats.class_pixels.sum())
    if labelled == 0:
        return [Finding(
            True, "no pixel is labelled with a class: every one is ignored or out of range",
            "No pixel of these examples is labelled with a class (every one is the ignore index "
            "or out of range): there is nothing to learn. Check the label handling above.",
            changes_classes=True,
        )]  # fmt: skip
    share = stats.ignored_pixels / stats.total_pixels
    if share <= 0.5:
        return []
    return [Finding(
        False, "most pixels are ignored",
        f"{share:.1%} of the pixels are the ignore index {recipe.data.ignore_index}; check that "
        "the masks and data.ignore_index agree.",
    )]  # fmt: skip


def _class_weight_lengths(stats, recipe, source, recipe_arg) -> list[Finding]:
    findings = []
    n_classes = recipe.data.num_classes
    heads = (("decode_head", recipe.model.decode_head), ("aux_head", recipe.model.aux_head))
    for key, head in heads:
        for i, loss in enumerate(getattr(head, "losses", [])):
            if loss.class_weight is not None and len(loss.class_weight) != n_classes:
                name = f"model.{key}.losses.{i}.class_weight"
                findings.append(Finding(
                    True, f"{name} has {len(loss.class_weight)} entries for {n_classes} classes",
                    f"{name} has {len(loss.class_weight)} entries but data.num_classes is "
                    f"{n_classes}: the model cannot be built. Give one weight per class (see "
                    "the class weights below).",
                ))  # fmt: skip
    return findings


def _absent_classes(stats, recipe, source, recipe_arg) -> list[Finding]:
    if not stats.class_pixels.sum():
        return []
    absent = np.flatnonzero(stats.class_images == 0).tolist()
    if not absent:
        return []
    names = recipe.data.names
    shown = ", ".join(f"{names[c]} ({c})" for c in absent[:SHOWN])
    more = ", ..." if len(absent) > SHOWN else ""
    return [Finding(
        False, f"{len(absent)} classes never appear",
        f"{len(absent)} of {len(names)} classes never appear in these {stats.read} examples: "
        f"{shown}{more}; more examples (--limit) may show them. If they never appear, check "
        "num_classes and the label handling.",
    )]  # fmt: skip


def _image_formats(stats, recipe, source, recipe_arg) -> list[Finding]:
    """With ``data.in_channels: 3``, 8-bit images stored grey or with alpha (made RGB)."""
    if recipe.data.in_channels != 3:
        return []
    other = {f: n for f, n in stats.image_formats.items()
             if "(3 channels, uint8)" not in f and ("channel, uint8" in f or "4 channels, uint8" in f)}  # fmt: skip
    if not other:
        return []
    listed = ", ".join(f"{n} {f}" for f, n in other.items())
    return [Finding(
        False, "some images are not stored as RGB",
        f"Images not stored as 8-bit RGB: {listed}. With data.in_channels: 3 training makes them "
        "RGB (grey is repeated, a fourth channel such as alpha dropped); to train on the channels "
        "as stored, set data.in_channels to their number (with one mean / std value each).",
    )]  # fmt: skip


# -- class weights --------------------------------------------------------------------------


def class_weights(stats: DataStats) -> np.ndarray | None:
    """Median frequency balancing weights, one per class (None when no class was seen).

    ``f_c`` = pixels of class ``c`` / labelled pixels of the images containing ``c``;
    ``w_c = median(f) / f_c`` over the classes seen; classes not seen get the largest weight.
    """
    seen = stats.class_pixels > 0
    if not seen.any():
        return None
    frequency = stats.class_pixels[seen] / stats.class_context[seen]
    weights = np.empty(stats.num_classes)
    weights[seen] = np.median(frequency) / frequency
    weights[~seen] = weights[seen].max()
    return weights


def class_weight_options(weights: np.ndarray, model) -> list[str]:
    """``--cfg-options`` values giving ``weights`` to the cross-entropy terms (or, in a head
    without one, to its first loss) of the decode head and the auxiliary head.

    Each value is the head's whole ``losses`` list as the recipe resolves it, weights added:
    a recipe that leaves a head's losses at their defaults has no list to index into.
    """
    import yaml

    rounded = [float(f"{w:.4g}") for w in weights]
    options = []
    for key, head in (("decode_head", model.decode_head), ("aux_head", model.aux_head)):
        if head is None:
            continue
        targets = [i for i, loss in enumerate(head.losses) if loss.type == "cross_entropy"]
        losses = []
        for i, loss in enumerate(head.losses):
            entry = {"type": loss.type, **loss.model_dump(exclude_defaults=True, exclude={"type"})}
            if i in (targets or [0]):
                entry["class_weight"] = rounded
            losses.append(entry)
        value = yaml.safe_dump(losses, default_flow_style=True, sort_keys=False, width=1 << 30)
        options.append(f"model.{key}.losses={value.strip()}")
    return options


# -- shared with the scan and the report ---------------------------------------------------


def recipe_palette(data):
    """``data.palette`` as a :class:`~hooktrain.tools.palette.Palette`, or None without one."""
    from hooktrain.tools.palette import palette_from_colours

    if data.palette is None:
        return None
    return palette_from_colours(data.palette, "data.palette")
