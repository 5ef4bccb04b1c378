"""How overlapping windows' logits are blended: ``model.inference.blend``.

``mean`` is MMSegmentation's slide inference: every window counts the same, so a pixel's
logits are the plain average of the windows covering it. The smooth windows weight each
window's pixels by how far they lie from its edges, as remote-sensing tools blend tiles, so a
window's edge (where its receptive field was cut off) counts less than another window's centre:

- ``hann``: ``sin(pi * (i + 0.5) / n) ** 2`` along each axis (a Hann window sampled at pixel
  centres, so never exactly 0), their product in 2-D;
- ``gaussian``: ``exp(-(i - (n - 1) / 2) ** 2 / (2 * sigma ** 2))`` with ``sigma = n / 8``
  along each axis (MONAI's ``sliding_window_inference`` ``mode="gaussian"``), their product;
- ``center``: each pixel is taken whole from the window whose centre is nearest (the U-Net
  paper's overlap-tile strategy). No blending: where a model's receptive field reaches less
  than half the overlap, ``(crop - stride) / 2``, the result equals whole-image inference.

The blended logits are ``sum(w * logits) / sum(w)`` over the windows covering a pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BLENDS = ("mean", "hann", "gaussian", "center")
Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), as slide_windows returns them


def axis_weights(length: int, blend: str) -> torch.Tensor:
    """The 1-D weights of one window axis of ``length`` pixels for ``hann``/``gaussian``/``mean``."""
    i = torch.arange(length, dtype=torch.float64)
    if blend == "hann":
        weights = torch.sin(math.pi * (i + 0.5) / length) ** 2
    elif blend == "gaussian":
        sigma = length / 8
        weights = torch.exp(-((i - (length - 1) / 2) ** 2) / (2 * sigma**2))
    elif blend == "mean":
        weights = torch.ones(length, dtype=torch.float64)
    else:
        raise ValueError(f"blend {blend!r} has no fixed window; give one of {', '.join(BLENDS)}")
    return weights.float()


def center_bounds(starts: Sequence[int], ends: Sequence[int], size: int) -> list[tuple[int, int]]:
    """For ``center``: the ``[lo, hi)`` range of one axis each window keeps, given the windows'
    distinct ``starts``/``ends`` along that axis (sorted): the pixels nearer its centre than any
    other window's, and the image edge for the first and last window."""
    centres = [(start + end) / 2 for start, end in zip(starts, ends, strict=True)]
    cuts = [0] + [math.floor((a + b) / 2) for a, b in zip(centres, centres[1:], strict=False)] + [size]
    return list(zip(cuts, cuts[1:], strict=False))


class WindowWeights:
    """The 2-D weight ``[h, w]`` of each window of a grid (see :func:`slide_windows`) for a blend.

    ``mean``/``hann``/``gaussian`` give every window of a size the same weight; ``center``
    gives each window a 0/1 mask of the pixels it keeps, which depends on its neighbours.
    """

    def __init__(self, windows: Sequence[Window], height: int, width: int, blend: str) -> None:
        if blend not in BLENDS:
            raise ValueError(f"blend {blend!r} is not one of {', '.join(BLENDS)}")
        self.blend = blend
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        if blend == "center":
            rows = sorted({(y1, y2) for y1, y2, _, _ in windows})
            cols = sorted({(x1, x2) for _, _, x1, x2 in windows})
            self._rows = dict(zip(rows, center_bounds(*zip(*rows, strict=True), height), strict=True))
            self._cols = dict(zip(cols, center_bounds(*zip(*cols, strict=True), width), strict=True))

    def __call__(self, window: Window) -> torch.Tensor:
        y1, y2, x1, x2 = window
        if self.blend == "center":
            (top, bottom), (left, right) = self._rows[(y1, y2)], self._cols[(x1, x2)]
            weight = torch.zeros(y2 - y1, x2 - x1)
            weight[top - y1 : bottom - y1, left - x1 : right - x1] = 1.0
            return weight
        size = (y2 - y1, x2 - x1)
        if size not in self._cache:
            self._cache[size] = torch.outer(axis_weights(size[0], self.blend), axis_weights(size[1], self.blend))
        return self._cache[size]
