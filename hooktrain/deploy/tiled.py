"""Predict an image of any size in overlapping tiles, holding only the rows in flight.

The tiles are MMSegmentation's slide windows (:func:`hooktrain.models.inference.slide_windows`)
over the whole image. They are visited one tile row at a time, top to bottom, so the image is
read forward only, a strip of ``crop_h`` rows at a time (a PNG or JPEG decoder never seeks
back), and the blended logits are kept for those rows only: a row is finished, turned into
labels and handed on, as soon as no later tile covers it. Memory is bounded by ``crop_h x
width`` pixels (the input strip, and ``classes`` float32 logits per pixel), never by the height;
``hooktrain predict`` writes each finished block of rows into a GeoTIFF as it goes.

Overlaps are blended by ``model.inference.blend`` (:mod:`hooktrain.models.blending`). Pixels
the source marks invalid (nodata) are left out: a tile with no valid pixel is not run, and the
finished rows carry the validity mask so the writer can keep nodata as nodata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from hooktrain.models.blending import WindowWeights
from hooktrain.models.inference import pad_to_multiple, predicted_labels, probabilities, slide_windows


class RowSource(Protocol):
    """Where tiles come from: an image read a band of rows at a time, top to bottom."""

    height: int
    width: int

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``[top, bottom)``: ``HxWxC`` uint8/uint16 pixels and a boolean valid mask
        ``HxW`` (None when every pixel is valid)."""


class ArraySource:
    """A :class:`RowSource` over an image already in memory (``HxWxC``)."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.image, self.valid = image, valid
        self.height, self.width = image.shape[:2]

    def read(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.image[top:bottom], None if self.valid is None else self.valid[top:bottom]


@dataclass
class FinishedRows:
    """Rows ``[top, top + len)`` of the prediction: ``labels`` ``[n, W]`` (uint8; int32 past
    256 classes), ``probabilities`` ``[C, n, W]`` (softmax, or the binary sigmoid; uint8
    x 255 rounded, or float32; None unless asked for) and ``valid`` ``[n, W]`` (None when every pixel is valid)."""

    top: int
    labels: np.ndarray
    probabilities: np.ndarray | None
    valid: np.ndarray | None


class _ForwardStrip:
    """Rows of a :class:`RowSource` for successive, forward-moving ranges: rows read once are
    kept while a later range still needs them, so the source is read top to bottom once."""

    def __init__(self, source: RowSource) -> None:
        self._source = source
        self._top = self._bottom = 0
        self._pixels: np.ndarray | None = None
        self._valid: np.ndarray | None = None

    def rows(self, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray | None]:
        start = max(top, self._bottom)
        new_pixels, new_valid = self._source.read(start, bottom) if bottom > start else (None, None)
        keep = slice(top - self._top, None)
        pixels = _joined(None if self._pixels is None else self._pixels[keep], new_pixels)
        if self._valid is not None or new_valid is not None:
            kept = None if self._pixels is None else self._valid_or_ones(self._valid, self._pixels)[keep]
            valid = _joined(kept, self._valid_or_ones(new_valid, new_pixels))
        else:
            valid = None
        self._top, self._bottom, self._pixels, self._valid = top, bottom, pixels, valid
        return pixels, valid

    @staticmethod
    def _valid_or_ones(valid: np.ndarray | None, pixels: np.ndarray | None) -> np.ndarray | None:
        if valid is not None or pixels is None:
            return valid
        return np.ones(pixels.shape[:2], bool)


def _joined(kept: np.ndarray | None, new: np.ndarray | None) -> np.ndarray:
    if kept is None or not len(kept):
        return new
    return kept if new is None else np.concatenate([kept, new])


class TiledPredictor:
    """Predict a :class:`RowSource` tile by tile; iterate :meth:`rows` for the finished rows.

    ``normalise`` maps an ``hxwxC`` tile to the model's float32 ``[C, h, w]`` input
    (``ValTransform.normalised``); ``logits_fn`` maps a batch of them to logits at the same
    size. ``cfg`` is the recipe's ``model.inference``: its ``crop_size``, ``stride``,
    ``blend``, ``size_divisor`` and binary ``threshold`` apply (no TTA). ``probabilities``:
    None, or the dtype of :attr:`FinishedRows.probabilities`, ``"uint8"`` (x 255, rounded) or
    ``"float32"``. ``on_tiles(n)`` is called as tiles finish (a progress bar).
    """

    def __init__(
        self,
        source: RowSource,
        normalise: Callable[[np.ndarray], torch.Tensor],
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        cfg,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
        probabilities: str | None = None,
        on_tiles: Callable[[int], None] | None = None,
    ) -> None:
        self.source = source
        self.cfg = cfg.model_copy(update={"flip": False, "scales": None})  # tiles run without TTA
        self._normalise, self._logits_fn = normalise, logits_fn
        self._device, self._batch_size = torch.device(device), batch_size
        if probabilities not in (None, "uint8", "float32"):
            raise ValueError(f"probabilities {probabilities!r}: give None, 'uint8' or 'float32'")
        self._probabilities = probabilities
        self._on_tiles = on_tiles or (lambda n: None)
        self.windows = slide_windows(source.height, source.width, cfg.crop_size, cfg.stride)
        self._weights = WindowWeights(self.windows, source.height, source.width, cfg.blend)
        self.tile_rows = _by_row(self.windows)

    def rows(self) -> Iterator[FinishedRows]:
        """The prediction, a block of finished rows at a time, top to bottom."""
        strip = _ForwardStrip(self.source)
        blend: _Accumulator | None = None
        tops = [top for top, _ in self.tile_rows] + [self.source.height]
        for (top, bottom), windows, next_top in zip(self.tile_rows, self._windows_by_row(), tops[1:], strict=True):
            pixels, valid = strip.rows(top, bottom)
            for batch in _batches([w for w in windows if valid is None or valid[:, w[2] : w[3]].any()],
                                  self._batch_size):  # fmt: skip
                logits = self._tile_logits([pixels[:, x1:x2] for _, _, x1, x2 in batch])
                if blend is None:
                    blend = _Accumulator(logits.shape[1], max(b - t for t, b in self.tile_rows), self.source.width)
                for window, tile_logits in zip(batch, logits, strict=True):
                    blend.add(tile_logits, self._weights(window), window[2], window[3])
            self._on_tiles(len(windows))
            done = next_top - top
            yield self._finished(top, blend, done, None if valid is None else valid[:done])
            if blend is not None:
                blend.shift(done)

    def _windows_by_row(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for top, bottom in self.tile_rows:
            yield [w for w in self.windows if (w[0], w[1]) == (top, bottom)]

    @torch.no_grad()
    def _tile_logits(self, tiles: list[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self._normalise(tile) for tile in tiles]).to(self._device)
        height, width = batch.shape[-2:]
        logits = self._logits_fn(pad_to_multiple(batch, self.cfg.size_divisor))
        return logits[..., :height, :width].float().cpu()

    def _finished(self, top: int, blend: _Accumulator | None, rows: int, valid: np.ndarray | None) -> FinishedRows:
        width = self.source.width
        if blend is None:  # no tile so far held a valid pixel
            return FinishedRows(top, np.zeros((rows, width), np.uint8), None, np.zeros((rows, width), bool))
        label_type = np.uint8 if blend.classes <= 256 else np.int32
        labels = np.empty((rows, width), label_type)
        probs = None if self._probabilities is None else np.empty((blend.classes, rows, width), self._probabilities)
        for left in range(0, width, _COLUMNS):  # a block of columns at a time: no full-width float copies
            right = min(left + _COLUMNS, width)
            logits = blend.logits(rows, left, right)
            labels[:, left:right] = predicted_labels(logits, self.cfg).numpy()
            if probs is not None:
                scores = probabilities(logits)
                if probs.dtype == np.uint8:
                    scores = (scores * 255).round_().to(torch.uint8)
                probs[:, :, left:right] = scores.numpy()
        return FinishedRows(top, labels, probs, valid)


_COLUMNS = 1024  # columns turned from logits into labels at a time


class _Accumulator:
    """The weighted logit sums and weight sums of the rows in flight, ``[classes, rows, width]``,
    allocated once; finished rows are shifted out at the top."""

    def __init__(self, classes: int, rows: int, width: int) -> None:
        self.classes = classes
        self.total = torch.zeros(classes, rows, width)
        self.weight = torch.zeros(rows, width)

    def add(self, logits: torch.Tensor, weight: torch.Tensor, left: int, right: int) -> None:
        height = logits.shape[1]
        self.total[:, :height, left:right] += logits * weight
        self.weight[:height, left:right] += weight

    def logits(self, rows: int, left: int, right: int) -> torch.Tensor:
        """The blended logits of the first ``rows`` rows, columns ``[left, right)``. A pixel no
        tile covered (only nodata tiles did) gets zeros."""
        weight = self.weight[:rows, left:right].clamp_min(torch.finfo(torch.float32).tiny)
        return self.total[:, :rows, left:right] / weight

    def shift(self, rows: int) -> None:
        """Drop the first ``rows`` (finished) rows: the rest move up, zeros come in below."""
        rest = self.weight.shape[0] - rows
        for buffer in (self.total, self.weight):
            buffer[..., :rest, :] = buffer[..., rows:, :].clone()
            buffer[..., rest:, :] = 0


def _by_row(windows: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    return sorted({(y1, y2) for y1, y2, _, _ in windows})


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
