"""What ``hooktrain data check`` saw and what it concludes: the types its modules share.

:class:`DataStats` is what :func:`hooktrain.tools.check.scan` counted in the examples;
:class:`Finding` is one diagnosis of them (:mod:`hooktrain.tools.check_findings`,
:mod:`hooktrain.tools.check_labels`), printed by :mod:`hooktrain.tools.check_report`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SHOWN", "DataStats", "Finding", "label_steps"]

SHOWN = 10  # example ids, colours or values listed per finding (and unknown colours kept)


@dataclass(frozen=True)
class Finding:
    """One diagnosis: ``problem`` (training would stop or learn wrong labels) or a note.

    A finding whose evidence does not settle between readings gives ``fixes``, one labelled
    line to paste per reading, instead of the one ``command``.
    """

    problem: bool
    summary: str  # a short clause for the one-line error
    detail: str  # the report's text: what was seen, what it means, the fix
    command: str = ""  # a line to paste (printed unwrapped under the detail)
    changes_classes: bool = False  # fixing it changes the class counts (and so the weights)
    fixes: tuple[tuple[str, str], ...] = ()  # (when it applies, its line to paste)


@dataclass
class DataStats:
    """What :func:`hooktrain.tools.check.scan` saw in the examples."""

    num_classes: int
    ignore_index: int
    columns: dict[str, str] = field(default_factory=dict)  # name -> type
    read: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (h, w) -> examples
    mask_sizes: Counter = field(default_factory=Counter)
    image_formats: Counter = field(default_factory=Counter)  # "JPEG RGB (3 channels, uint8)"
    mask_formats: Counter = field(default_factory=Counter)
    image_kinds: Counter = field(default_factory=Counter)  # "4 channels, uint16" -> examples
    wrong_images: list = field(default_factory=list)  # (example id, message): decodable, not data.in_channels
    raw_pixels: Counter = field(default_factory=Counter)  # raw mask value -> pixels
    raw_images: Counter = field(default_factory=Counter)  # raw mask value -> images
    # raw mask value -> pixels that touch another value (4-neighbours) or the image border
    raw_edge_pixels: Counter = field(default_factory=Counter)
    index_masks: int = 0  # masks counted as class indices (raw_pixels, raw_images)
    class_pixels: np.ndarray = None  # [C] pixels per class after label handling
    class_images: np.ndarray = None  # [C] images containing the class
    class_context: np.ndarray = None  # [C] labelled pixels of the images containing the class
    ignored_pixels: int = 0
    total_pixels: int = 0  # pixels of the masks counted (index masks and matched colour masks)
    out_of_range: Counter = field(default_factory=Counter)  # raw value -> pixels
    out_of_range_ids: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)  # (example id, message)
    bad_masks: list = field(default_factory=list)  # (example id, message): decodable, unusable
    size_mismatch: list = field(default_factory=list)  # (example id, image hw, mask hw)
    grey_rgb_masks: list = field(default_factory=list)  # example ids
    colour_masks: list = field(default_factory=list)  # example ids
    colours: Counter = field(default_factory=Counter)  # colour -> pixels (colour masks)
    unknown_colours: dict = field(default_factory=dict)  # colour -> (example id, x, y)
    unknown_colour_pixels: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for name in ("class_pixels", "class_images", "class_context"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.num_classes, np.int64))

    @property
    def decoded(self) -> int:
        """Examples whose image and mask both decoded."""
        return sum(self.mask_sizes.values())


def label_steps(data) -> list[str]:
    """The label handling steps the recipe turns on, in the order they apply."""
    return [name for name, on in (("reduce_zero_label", data.reduce_zero_label),
                                  ("label_map", bool(data.label_map))) if on]  # fmt: skip
