"""The label-value diagnoses of ``hooktrain data check``: mask values the recipe's label
handling does not expect, and what they most likely mean.

Some value patterns have two readings whose fixes contradict each other: masks holding
0..num_classes are ADE20K-like (0 = other: reduce_zero_label) or CamVid-like (the last value
is void: map it to the ignore index); 0/255 masks are binary or void around class 0; values
19..33 are Cityscapes labelIds or the classes of a larger dataset. Clues (where a value's
pixels lie, in how many masks, the recipe's class names) are weighed, and a finding
recommends one fix only when they settle it; otherwise it names both readings and carries a
labelled fix for each. See docs/data-check.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from hooktrain.tools.check_stats import SHOWN, DataStats, Finding, label_steps

__all__ = ["CITYSCAPES_LABEL_MAP", "label_value_findings"]

# Cityscapes labelIds (gtFine_labelIds.png) to the 19 trainIds, from cityscapesScripts'
# labels.py; every other id is not evaluated and becomes 255.
CITYSCAPES_LABEL_MAP = {
    **{i: 255 for i in range(34)},
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def label_value_findings(stats, recipe, source, recipe_arg) -> list[Finding]:
    """Raw value patterns MMSegmentation users get wrong, then any other out-of-range values.

    Where a pattern has two readings (which value is not a class, what 255 or 19..33 mean),
    :func:`_verdict` weighs the clues; a finding recommends one fix only when they settle it.
    """
    data = recipe.data
    if not stats.raw_pixels:
        return []
    n_classes, ignore = data.num_classes, data.ignore_index
    values = set(stats.raw_pixels)
    labelled = values - {ignore}
    top = max(labelled) if labelled else None
    bad = set(stats.out_of_range)
    findings: list[Finding] = []
    if values <= {0, 255} and 255 in values and ignore == 255 and not data.reduce_zero_label \
            and 255 not in data.label_map:  # fmt: skip
        findings.append(_zero_and_255(stats, data, recipe_arg))
    elif not data.reduce_zero_label and not data.label_map and top == n_classes \
            and bad == {n_classes}:  # fmt: skip
        findings.append(_one_value_too_many(stats, data))
    elif not data.label_map and n_classes == 19 and bad and all(19 <= v <= 33 for v in bad):
        findings.append(_cityscapes_label_ids(stats, data))
    elif data.reduce_zero_label and 0 not in values and top is not None and top < n_classes:
        # A note, not a problem: a small sample of ADE20K-like data can lack 0 ("other") and
        # the top class alike.
        findings.append(Finding(
            False, "reduce_zero_label may be wrong: 0 never appears",
            f"reduce_zero_label is on, but 0 never appears and the maximum is {top} (below "
            f"num_classes={n_classes}). If the masks are 0-based class indices, every class "
            "moves down by one and class 0's pixels are ignored: set "
            "data.reduce_zero_label=false. If 0 only means 'unlabelled' and these examples have "
            "none, the recipe is right (check more examples with --limit).",
        ))  # fmt: skip
    elif bad:
        findings.append(_scaled_values(stats, data) or _instance_values(stats, data)
                        or _out_of_range(stats, data))  # fmt: skip
    if data.reduce_zero_label and 0 in values and top == n_classes - 1 and not data.label_map:
        findings.append(_zero_reduced_away(stats, data))
    return findings


# -- two readings of one pattern: the clues and the verdict ----------------------------------
#
# A clue is one piece of evidence for one reading, weighing 1 (weak) or 2 (strong). A reading
# is settled when its clues weigh 2 or more, no clue supports another reading, and one of its
# clues is decisive (where the pixels lie, the dataset's own class names, how many masks
# agree): presence, shares and a stray class name alone only lean.

_MIN_PIXELS = 100  # a value with fewer pixels: where they lie says nothing
# Names of no class. "background" is not one: it is a class in VOC (raw 0, trained) and in
# LoveDA (raw 1, after reduce_zero_label drops its 0 = no data), so it fits either reading.
_NOT_A_CLASS = frozenset({"other", "others", "unlabelled", "unlabeled", "void", "ignore",
                          "ignored", "unknown", "none", "nodata", "no data", "undefined",
                          "invalid"})  # fmt: skip
# Datasets recognised by their first class names: which raw value is not a class, and what
# their masks call it. ADE20K stores 0 = other and 1..150; SegNet's CamVid 0..10 and 11 = void.
_KNOWN_NAMES = (
    ("ADE20K", ("wall", "building", "sky", "floor", "tree"), "zero", "other"),
    ("CamVid", ("sky", "building", "pole", "road"), "top", "void"),
)
_CITYSCAPES_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                    "truck", "bus", "train", "motorcycle", "bicycle")  # fmt: skip


@dataclass(frozen=True)
class _Clue:
    reading: str  # the reading it supports
    weight: int  # 1 weak, 2 strong
    text: str  # what was seen, as a clause
    decisive: bool = True  # may settle a reading on its own weight


def _verdict(clues: list[_Clue]) -> str | None:
    """The reading ``clues`` settle, or None when they do not."""
    weights: Counter = Counter()
    for clue in clues:
        weights[clue.reading] += clue.weight
    if len(weights) != 1:
        return None
    [(reading, weight)] = weights.items()
    return reading if weight >= 2 and any(c.decisive for c in clues) else None


def _evidence(clues: list[_Clue]) -> str:
    """The clues as one clause, each with its strength."""
    said = [f"{c.text} ({'strong' if c.weight > 1 else 'weak'})" for c in clues]
    return "; ".join(said) or "nothing in these examples tells them apart"


def _share(stats: DataStats, value: int) -> str:
    """``value``'s share of the raw pixels, e.g. ``5.6%``."""
    return f"{stats.raw_pixels[value] / sum(stats.raw_pixels.values()):.1%}"


def _name(name: str) -> str:
    """A class name as compared: lower case, ``_`` and ``-`` as spaces."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _edge_share(stats: DataStats, value: int) -> float | None:
    """The share of ``value``'s pixels that touch another value or the image border (None
    when too few pixels hold it)."""
    pixels = stats.raw_pixels[value]
    return stats.raw_edge_pixels[value] / pixels if pixels >= _MIN_PIXELS else None


def _class_edge_share(stats: DataStats, values) -> float | None:
    """The median edge share of ``values`` (classes in every reading), or None."""
    shares = [s for v in values if (s := _edge_share(stats, v)) is not None]
    return float(np.median(shares)) if shares else None


def _boundary_clue(stats: DataStats, candidates: dict[str, int], classes) -> _Clue | None:
    """Which of two candidate values gathers along boundaries and image borders, as void and
    'other' labels do (annotators leave the outlines of objects and what they skip)."""
    (ra, a), (rb, b) = candidates.items()
    ea, eb = _edge_share(stats, a), _edge_share(stats, b)
    if ea is None or eb is None:
        return None
    median = _class_edge_share(stats, classes)
    for reading, v, ev, w, ew in ((ra, a, ea, b, eb), (rb, b, eb, a, ea)):
        if ev >= 1.5 * ew and (median is None or ev >= median):
            strong = ev >= 3 * ew and median is not None and ev >= 2 * median
            of_classes = f" and {median:.0%} for the median class" if median is not None else ""
            return _Clue(reading, 2 if strong else 1,
                         f"{v} gathers along boundaries, {ev:.0%} of its pixels touching another "
                         f"value or the image border against {ew:.0%} of {w}'s{of_classes}")  # fmt: skip
    return None


def _presence_clue(stats: DataStats, candidates: dict[str, int]) -> _Clue | None:
    """A value in nearly every image, against one seldom there or one that is as frequent but
    far larger: unlabelled pixels occur in nearly every mask, a class seldom does, and a value
    that is everywhere and large is more likely a class (sky, road, wall) than void."""
    n = stats.index_masks
    if n < 5:
        return None
    total = sum(stats.raw_pixels.values())
    (ra, a), (rb, b) = candidates.items()
    for reading, v, w in ((ra, a, b), (rb, b, a)):
        pv, pw = stats.raw_images[v] / n, stats.raw_images[w] / n
        sv, sw = stats.raw_pixels[v] / total, stats.raw_pixels[w] / total
        if pv >= 0.9 and pw <= 0.5:
            return _Clue(reading, 1, f"{v} is in {pv:.0%} of the masks and {w} in {pw:.0%}",
                         decisive=False)  # fmt: skip
        if pv >= 0.9 and pw >= 0.9 and sw >= 3 * sv:
            return _Clue(reading, 1, f"both are in nearly every mask, but {w} covers {sw:.0%} of "
                         f"the pixels and {v} {sv:.1%}", decisive=False)  # fmt: skip
    return None


def _name_clues(data, candidates: dict[str, int]) -> list[_Clue]:
    """What ``data.class_names`` say. A list of real classes fits both readings (ADE20K's
    starts with wall, which is raw 1; CamVid's with sky, raw 0): only a known dataset's list,
    or a name of no class at either end, tells which raw value is not a class."""
    names = [_name(n) for n in data.class_names or []]
    if not names:
        return []
    for dataset, first, reading, called in _KNOWN_NAMES:
        if tuple(names[: len(first)]) == first:
            return [_Clue(reading, 2, f"data.class_names are {dataset}'s, whose masks hold "
                          f"{candidates[reading]} = {called}")]  # fmt: skip
    clues = []
    for reading, name, end in (("zero", names[0], "first"), ("top", names[-1], "last")):
        if name in _NOT_A_CLASS:
            clues.append(_Clue(reading, 1, f"the {end} class name is {name!r}, the name of no "
                               f"class, as if the list named raw value {candidates[reading]}, "
                               "and data.class_names then needs fixing too",
                               decisive=False))  # fmt: skip
    return clues


def _paste(options: list[str]) -> str:
    """``--cfg-options`` and ``options``, quoted for a shell."""
    import shlex

    return "--cfg-options " + " ".join(shlex.quote(o) for o in options)


def _flow(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()


def _num_classes_options(data, num_classes: int) -> list[str]:
    """``--cfg-options`` values setting ``data.num_classes``, with the recipe's class_names and
    palette made to fit (padded or cut; binary: the defaults): a recipe that names its classes
    does not validate with another count."""
    from hooktrain.recipe.data import default_palette

    labels = 2 if num_classes == 1 else num_classes
    options = [f"data.num_classes={num_classes}"]
    names, palette = data.class_names, data.palette
    if names is not None and len(names) not in {num_classes, labels}:
        padded = [*names, *(f"class_{i}" for i in range(len(names), labels))][:labels]
        options.append("data.class_names=" + ("null" if num_classes == 1 else _flow(padded)))
    if palette is not None and len(palette) != labels:
        padded = [*palette, *default_palette(labels)[len(palette):]][:labels]
        options.append("data.palette=" + ("null" if num_classes == 1 else _flow(padded)))
    return options


# -- 0..num_classes: one value too many -----------------------------------------------------


def _one_value_too_many(stats: DataStats, data) -> Finding:
    """Masks holding 0..N (or 1..N) for N classes: 0 is 'other' or the masks are 1-based
    (reduce_zero_label), or N is void (map it to the ignore index); when the masks mark void
    with the ignore index already, all N + 1 values may be classes."""
    n, ignore = data.num_classes, data.ignore_index
    candidates = {"zero": 0, "top": n}
    clues = _name_clues(data, candidates)
    if 0 in stats.raw_pixels:
        head, values = f"0 appears and {n} is the maximum", f"0..{n}"
        seen = (f"The masks hold 0..{n}, one value more than num_classes={n}, so one value is "
                "probably not a class, and training would learn it as one.")  # fmt: skip
        zero_is = "0 is 'other' or 'unlabelled' (as in ADE20K)"
        zero_when, zero_why = "if 0 is 'other' (as in ADE20K)", "0 looks like an 'other' label"
        clues += [c for c in (_boundary_clue(stats, candidates, range(1, n)),
                              _presence_clue(stats, candidates)) if c]  # fmt: skip
    else:
        head, values = f"no 0 appears and {n} is the maximum", f"1..{n} (no 0)"
        seen = (f"The masks hold 1..{n} and no 0, for num_classes={n}: {n} is out of range, "
                f"and either every value is one too high or {n} is not a class.")  # fmt: skip
        zero_is = "the masks are 1-based, or 0 is 'other' (as in ADE20K) and none is read here"
        zero_when = "if the masks are 1-based (or 0 is 'other', as in ADE20K)"
        zero_why = "the masks look 1-based"
        clues += _lone_top_clues(stats, n)
    # A dataset that marks void with the ignore index seldom has a second such value.
    holds_ignore = stats.raw_pixels[ignore] > 0
    verdict = None if holds_ignore else _verdict(clues)
    zero = _paste(["data.reduce_zero_label=true"])
    top = _paste([f"data.label_map={{{n}: {ignore}}}"])
    first = head[:1].upper() + head[1:]  # the detail's first words
    zero_reading = (f"{zero_is}: reduce_zero_label ignores 0 and makes 1..{n} the classes "
                    f"0..{n - 1}")  # fmt: skip
    top_reading = (f"{n} is void (as CamVid's 11): map it to the ignore index, and 0..{n - 1} stay "
                   f"the classes (data.ignore_index={n} does the same while the masks hold no "
                   f"{ignore})")  # fmt: skip
    if verdict == "zero":
        return Finding(
            True, f"{head}: reduce_zero_label is probably wanted ({zero_why}; set "
            "data.reduce_zero_label=true)",
            f"{first}: reduce_zero_label is probably wanted. {seen} The evidence points to 0: "
            f"{_evidence(clues)}. So {zero_reading}. The other reading, {n} void and 0 a class "
            f"({data.names[0]}), would map {n} to the ignore index instead "
            f"(data.label_map={{{n}: {ignore}}}).",
            zero, changes_classes=True,
        )  # fmt: skip
    if verdict == "top":
        return Finding(
            True, f"{head}: {n} is probably a void label, map it to the ignore index (set "
            f"data.label_map={{{n}: {ignore}}})",
            f"{first}: {n} is probably a void label. {seen} The evidence points to {n}: "
            f"{_evidence(clues)}. So {top_reading}. The other reading, 0 'other' "
            f"(reduce_zero_label), would ignore class 0 ({data.names[0]}) and shift every class "
            "by one.",
            top, changes_classes=True,
        )  # fmt: skip
    fixes = [(f"{zero_when}:", zero), (f"if {n} is void:", top)]
    also, held = "", ""
    if holds_ignore:
        fixes.append((f"if all of 0..{n} are classes:", _paste(_num_classes_options(data, n + 1))))
        also = f", if all are classes set data.num_classes={n + 1}"
        held = (f" The masks also hold the ignore index {ignore} ({_share(stats, ignore)} of the "
                "pixels): a dataset that marks void with it seldom has a second such value, so "
                f"all of 0..{n} may be classes (num_classes {n + 1}).")  # fmt: skip
    return Finding(
        True, f"the masks hold {values}, one value more than num_classes={n}, and these "
        f"examples do not tell which is not a class: {zero_when} set "
        f"data.reduce_zero_label=true, if {n} is void set data.label_map={{{n}: {ignore}}}{also}; "
        "look at a few masks or the dataset's documentation to choose",
        f"{seen} Either {zero_reading}; or {top_reading}. Each reading trains a wrong model if "
        f"the other is true, and the evidence does not settle it: {_evidence(clues)}.{held} To "
        "choose, look at a few masks (the value that outlines the objects and fills the gaps "
        "between them is the unlabelled one) or at the dataset's documentation:",
        fixes=tuple(fixes), changes_classes=True,
    )  # fmt: skip


def _lone_top_clues(stats: DataStats, n: int) -> list[_Clue]:
    """Without any 0 to compare with: does ``n`` lie along boundaries (void) or in regions as
    the classes do, and how many masks lack 0 (1-based masks lack it in every one)."""
    clues = []
    top, classes = _edge_share(stats, n), _class_edge_share(stats, range(1, n))
    if top is not None and classes is not None:
        lies = (f"{top:.0%} of {n}'s pixels touch another value or the image border, against "
                f"{classes:.0%} for the median class")  # fmt: skip
        if top >= 2 * classes:
            clues.append(_Clue("top", 2, f"{n} gathers along boundaries, {lies}"))
        elif top <= 1.5 * classes:
            clues.append(_Clue("zero", 1, f"{n} forms regions as the classes do, {lies}",
                               decisive=False))  # fmt: skip
    # Class 0 (background, sky, road, wall: mostly a frequent class) missing from 20 masks
    # says 1-based masks, or 'other' labels that these examples lack: reduce_zero_label either way.
    masks = stats.index_masks
    if masks >= 5:
        clues.append(_Clue("zero", 2 if masks >= 20 else 1, f"none of the {masks} masks holds a 0",
                           decisive=masks >= 20))  # fmt: skip
    return clues


def _zero_reduced_away(stats: DataStats, data) -> Finding:
    """reduce_zero_label on while the largest value is num_classes - 1: right for ADE20K-like
    examples that lack the last class, wrong where 0 is a class (VOC's background)."""
    n, ignore = data.num_classes, data.ignore_index
    zero, classes = _edge_share(stats, 0), _class_edge_share(stats, range(1, n))
    void = _edge_share(stats, ignore)
    share = stats.raw_pixels[0] / sum(stats.raw_pixels.values())
    seen = (f"reduce_zero_label is on and the largest value is {n - 1} = num_classes - 1, so "
            f"after the shift class {n - 1} never appears, and 0 ({share:.0%} of the pixels, in "
            f"{stats.raw_images[0]} of {stats.index_masks} masks) is ignored.")  # fmt: skip
    if None not in (zero, classes, void) and void >= 2 * classes and zero <= 1.5 * classes:
        return Finding(
            True, "reduce_zero_label is on but 0 looks like a class (as VOC's background): set "
            "data.reduce_zero_label=false",
            f"{seen} 0 looks like a class: it forms regions as the classes do ({zero:.0%} of "
            f"its pixels touch another value or the image border, {classes:.0%} for the median "
            f"class), while the ignore index {ignore} lies along the boundaries ({void:.0%}), "
            "as VOC's void outlines; a dataset that marks void that way seldom has an 'other' "
            "0 too. Then reduce_zero_label ignores class 0 and shifts every class by one: set "
            "it to false. (If 0 is 'other' and these examples only lack the last class, the "
            "recipe is right: check more examples with --limit.)",
            _paste(["data.reduce_zero_label=false"]), changes_classes=True,
        )  # fmt: skip
    where = (f" {zero:.0%} of 0's pixels touch another value or the image border, "
             f"{classes:.0%} for the median class." if None not in (zero, classes) else "")  # fmt: skip
    return Finding(
        False, "reduce_zero_label may be wrong",
        f"{seen}{where} If 0 is a real class (as VOC's background), set "
        "data.reduce_zero_label=false; if it is 'other' (as ADE20K's) and these examples only "
        "lack the last class, the recipe is right (check more examples with --limit).",
    )  # fmt: skip


# -- 0 and 255 only ------------------------------------------------------------------------


def _zero_and_255(stats: DataStats, data, recipe_arg: str) -> Finding:
    """Masks of only 0 and 255 while 255 is the ignore index: a binary mask whose foreground is
    ignored, or a multi-class dataset's void (255) around examples that hold only class 0."""
    from shlex import quote

    n = stats.index_masks
    clues = []
    if n >= 10:
        clues.append(_Clue("binary", 2, f"none of the {n} masks holds a class but 0, where a "
                           f"dataset of {data.num_classes} classes would show others"))  # fmt: skip
    elif n >= 2:
        clues.append(_Clue("binary", 1, f"none of the {n} masks holds a class but 0",
                           decisive=False))  # fmt: skip
    edge = _edge_share(stats, 255)
    if edge is not None and edge >= 0.5:
        clues.append(_Clue("void", 1, f"{edge:.0%} of the 255 pixels touch a 0 or the image "
                           "border: thin bands, as void outlines are, but so are thin objects "
                           "such as vessels or cracks", decisive=False))  # fmt: skip
    elif edge is not None and edge <= 0.25:
        clues.append(_Clue("binary", 1, f"255 forms solid regions, only {edge:.0%} of its "
                           "pixels touching a 0 or the image border", decisive=False))  # fmt: skip
    binary = _paste([*_num_classes_options(data, 1), "data.mask_scale=255",
                     "data.ignore_index=254"])  # fmt: skip
    binary_reading = ("255 is the foreground, which is ignored and never learnt: train binary "
                      "segmentation with 255 as the foreground value (and an ignore index the "
                      "masks never hold)")  # fmt: skip
    void_reading = ("255 is void (as VOC's outlines) and these examples hold no class but 0: the "
                    "recipe is right, check more examples (--limit)")  # fmt: skip
    if _verdict(clues) == "binary":
        return Finding(
            True, "the masks hold only 0 and 255 and 255 is the ignore index, so the foreground "
            "is never learnt: train them as binary masks (num_classes 1, mask_scale 255, "
            "ignore_index 254)",
            "The masks hold only the values 0 and 255, and 255 is data.ignore_index. The "
            f"evidence says they are binary masks: {_evidence(clues)}. So {binary_reading}. The "
            f"other reading: {void_reading}.",
            binary, changes_classes=True,
        )  # fmt: skip
    return Finding(
        True, "the masks hold only 0 and 255 and 255 is the ignore index: if 255 is the "
        "foreground, train binary masks (num_classes 1, mask_scale 255, ignore_index 254); if "
        "it is void, these examples hold only class 0: check more with --limit",
        f"The masks hold only the values 0 and 255, and 255 is data.ignore_index. Either "
        f"{binary_reading}; or {void_reading}. The evidence does not settle it: "
        f"{_evidence(clues)}. Look at a few masks: a foreground fills objects, void outlines "
        "them.",
        fixes=(("if 255 is the foreground:", binary),
               ("if 255 is void, read more examples:",
                f"hooktrain data check {quote(recipe_arg)} --limit 1000")),
        changes_classes=True,
    )  # fmt: skip


# -- Cityscapes labelIds -------------------------------------------------------------------


def _cityscapes_label_ids(stats: DataStats, data) -> Finding:
    """Values up to 33 with num_classes 19: Cityscapes labelIds (the label_map to trainIds), or
    the class indices of a dataset with more classes."""
    top = max(stats.out_of_range)
    evaluated = [k for k, v in CITYSCAPES_LABEL_MAP.items() if v != 255]
    share = sum(stats.raw_pixels[k] for k in evaluated) / sum(stats.raw_pixels.values())
    clues = []
    if tuple(_name(n) for n in data.class_names or ()) == _CITYSCAPES_NAMES:
        clues.append(_Clue("ids", 2, "data.class_names are Cityscapes' 19 trainId classes"))
    if share >= 0.8:
        clues.append(_Clue("ids", 2, f"the 19 evaluated labelIds hold {share:.0%} of the pixels, "
                           "about 90% in Cityscapes"))  # fmt: skip
    elif share < 0.6:
        clues.append(_Clue("classes", 1, f"the 19 evaluated labelIds hold only {share:.0%} of "
                           "the pixels, about 90% in Cityscapes", decisive=False))  # fmt: skip
    label_map = _paste(["data.label_map={" + ", ".join(
        f"{k}: {v}" for k, v in sorted(CITYSCAPES_LABEL_MAP.items())) + "}"])  # fmt: skip
    ids = ("Cityscapes labelIds (*_gtFine_labelIds.png, 0..33), not the 19 trainIds, which need "
           "the label_map that sends the 19 evaluated ids to 0..18 and every other id to 255 (or "
           "read the *_gtFine_labelTrainIds.png files instead)")  # fmt: skip
    classes = (f"the class indices of a dataset with {top + 1} or more classes, which need "
               f"data.num_classes={top + 1}")  # fmt: skip
    if _verdict(clues) == "ids":
        return Finding(
            True, f"values up to {top}: Cityscapes labelIds, use the label_map "
            "(labelIds to trainIds; the report prints it)",
            f"Values up to {top} with num_classes=19: these are {ids}. The evidence: "
            f"{_evidence(clues)}. The other reading, {classes}, would fit a dataset that is not "
            "Cityscapes.",
            label_map, changes_classes=True,
        )  # fmt: skip
    return Finding(
        True, f"values up to {top} with num_classes=19: Cityscapes labelIds (use the label_map "
        f"the report prints) or the classes of a dataset with {top + 1} (set "
        f"data.num_classes={top + 1}); check which the masks store",
        f"Values up to {top} with num_classes=19: either {ids}; or {classes}. The evidence "
        f"does not settle it: {_evidence(clues)}. Check the dataset's documentation:",
        fixes=(("if they are Cityscapes labelIds:", label_map),
               (f"if they are {top + 1} classes:", _paste(_num_classes_options(data, top + 1)))),
        changes_classes=True,
    )  # fmt: skip


# -- 16-bit values: scaled or instance-coded -------------------------------------------------

_SCALES = (256, 257, 1000)  # class << 8, class * 257 (0..255 stretched to 0..65535), class * 1000


def _scaled_values(stats: DataStats, data) -> Finding | None:
    """Wide masks whose values are all class indices times one scale (256, 257 or 1000), as
    masks saved to be visible in a viewer or by a converter: ``label_map`` divides them."""
    values = sorted(v for v in stats.raw_pixels if v not in (0, data.ignore_index))
    if data.binary or data.reduce_zero_label or data.label_map or not values or values[-1] < 256:
        return None
    for scale in _SCALES:
        classes = [v // scale for v in values if v != data.ignore_index * scale]
        if all(v % scale == 0 for v in values) and max(classes, default=0) < data.num_classes:
            break
    else:
        return None
    mapping = {k * scale: k for k in range(1, data.num_classes)}
    if data.ignore_index * scale <= 65535:
        mapping[data.ignore_index * scale] = data.ignore_index
    command = _paste(["data.label_map={" + ", ".join(f"{k}: {v}" for k, v in mapping.items())
                      + "}"])  # fmt: skip
    shown = ", ".join(str(v) for v in values[:SHOWN]) + (", ..." if len(values) > SHOWN else "")
    return Finding(
        True, f"the mask values [{shown}] are class indices times {scale}: divide them with the "
        "label_map the report prints",
        f"Every mask value but 0 is a multiple of {scale} ([{shown}], up to class "
        f"{max(classes, default=0)} of num_classes={data.num_classes}): 16-bit masks that store "
        f"class c as c x {scale}, to be visible in an image viewer or by a converter. Map each "
        f"back to its class with data.label_map (every class 1..{data.num_classes - 1}, so "
        "masks not read here work too). Were they class indices as they are, num_classes would "
        f"have to be {values[-1] + 1}, with only multiples of {scale} used: unlikely.",
        command, changes_classes=True,
    )  # fmt: skip


def _instance_values(stats: DataStats, data) -> Finding | None:
    """Values from 1000 up whose remainders mod 1000 are small and repeat per thousand: class x
    1000 + instance, as Cityscapes' *_instanceIds.png. No label_map lists every instance."""
    wide = sorted(v for v in stats.raw_pixels if v >= 1000)
    groups = Counter(v // 1000 for v in wide)
    if len(wide) < 3 or any(v % 1000 >= 100 for v in wide) or max(groups.values()) < 2:
        return None
    classes = sorted(groups)
    return Finding(
        True, "values from 1000 up look like class x 1000 + instance (instance masks such as "
        "Cityscapes' *_instanceIds.png): use the semantic masks",
        f"{len(wide)} values from 1000 up ({', '.join(map(str, wide[:SHOWN]))}"
        f"{', ...' if len(wide) > SHOWN else ''}) fall into {len(classes)} thousands "
        f"({', '.join(map(str, classes[:SHOWN]))}) with small remainders: class x 1000 + "
        "instance number, the encoding of instance masks (Cityscapes' *_instanceIds.png; the "
        "values under 1000 are classes without instances). Training needs one class per pixel: "
        "point the source at the dataset's semantic masks (Cityscapes' *_labelIds.png or "
        "*_labelTrainIds.png), or convert these with value // 1000 for values from 1000 up "
        "(Cityscapes' then hold labelIds, which need the labelIds-to-trainIds label_map). (If "
        "they really are class ids, raise num_classes.)",
        changes_classes=True,
    )  # fmt: skip


def _out_of_range(stats: DataStats, data) -> Finding:
    bad = sorted(stats.out_of_range)
    pixels = stats.out_of_range.total()
    shown = ", ".join(str(v) for v in bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
    steps = label_steps(data)
    after = f" after {' and '.join(steps)}" if steps else ""
    seen = (f"Raw values [{shown}] ({pixels} pixels in {len(stats.out_of_range_ids)} examples, "
            f"e.g. {stats.out_of_range_ids[0]}) fall outside [0, {data.num_labels}){after} and "
            f"are not the ignore index {data.ignore_index}.")  # fmt: skip
    fix = (f"If they are classes, raise data.num_classes (to {max(bad) + 1}?); otherwise map them "
           "with data.label_map (e.g. to the ignore index)")  # fmt: skip
    if data.out_of_range == "error":
        return Finding(
            True, f"mask values [{shown}] are out of range [0, {data.num_labels}){after}: fix "
            "num_classes or label_map, or set data.out_of_range=ignore",
            f"{seen} With data.out_of_range: error training stops at the first such mask. "
            f"{fix}, or set data.out_of_range: ignore.",
            changes_classes=True,
        )  # fmt: skip
    share = pixels / max(stats.total_pixels, 1)
    return Finding(
        False, "out-of-range values are ignored",
        f"{seen} data.out_of_range: ignore treats them as ignored ({share:.2%} of the pixels). "
        f"{fix}.",
    )  # fmt: skip
