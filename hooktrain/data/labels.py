"""From raw examples to arrays: image and mask decoding, and the label mapping of masks.

Decoding uses OpenCV's ``cv2.imdecode`` (libjpeg-turbo / libpng, about 1 ms for a 683x512
JPEG here) and also accepts what ``datasets`` hands over: raw bytes, the
``{"bytes", "path"}`` dict of ``Image(decode=False)`` columns, PIL images and numpy arrays.

Label mapping follows MMSegmentation's ``LoadAnnotations`` (1.x order), applied exactly once
per mask, before any geometric transform:

1. ``reduce_zero_label``: 0 becomes the ignore index, every other label moves down by one,
   and the ignore index stays the ignore index (mmseg: ``l[l==0]=255; l=l-1; l[l==254]=255``).
2. ``label_map`` ``{old: new}``: every pixel whose value was ``old`` *before* this step
   becomes ``new`` (so ``{1: 2, 2: 3}`` sends 1 to 2, not to 3).
3. Values outside ``[0, num_classes)`` that are not the ignore index are out of range:
   ``out_of_range="error"`` raises a :class:`~hooktrain.errors.UserError`, ``"ignore"`` maps
   them to the ignore index and counts them.

One deliberate difference from mmseg: masks wider than 8 bits (16-bit PNGs) are not wrapped
to ``uint8`` first, so a label of 300 is reported as out of range instead of becoming 44.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image as PILImage

from hooktrain.errors import UserError, did_you_mean

__all__ = ["decode_image", "decode_mask", "example_name", "LabelMapper"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of an indexed (palette) PNG
# OpenCV >= 4.11 decodes straight to RGB, which saves a full-image cvtColor.
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_OUT_OF_RANGE_POLICIES = ("error", "ignore")
# OpenCV's decoders log their complaints about a broken file to stderr ("[ERROR:0@2.7] global
# grfmt_png.cpp ..."); the error or warning that names the file says it once, on one line.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)


def example_name(example_id: Any) -> str:
    """How messages name an example: ``example 'cat.jpg (shard 0 row 3)'``."""
    return f"example {example_id!r}" if example_id is not None else "an example"


def _encoded_bytes(data: Any, example_id: Any, what: str) -> bytes | None:
    """The encoded file content of ``data``, or None when ``data`` is already decoded."""
    if isinstance(data, Mapping):  # a datasets Image(decode=False) cell: {"bytes", "path"}
        if data.get("bytes") is not None:
            return bytes(data["bytes"])
        if data.get("path"):
            try:
                return Path(data["path"]).read_bytes()
            except OSError as err:
                raise UserError(
                    f"{example_name(example_id)}: cannot read the {what} file {data['path']!r} ({err}); "
                    "check that the dataset's files are where its paths say"
                ) from err
        raise UserError(
            f"{example_name(example_id)}: the {what} cell has neither bytes nor a path; "
            "check the dataset's image columns"
        )
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return None


def decode_image(data: Any, example_id: Any = None) -> np.ndarray:
    """Decode an image to an ``HxWx3`` ``uint8`` RGB array.

    ``data`` is encoded bytes (JPEG, PNG, ...), a ``{"bytes", "path"}`` dict, a PIL image, or
    a ``uint8`` array (``HxW`` grey, ``HxWx3`` RGB or ``HxWx4`` RGBA, whose alpha is dropped).
    EXIF orientation is applied to encoded bytes, as MMSegmentation's loader does.
    """
    raw = _encoded_bytes(data, example_id, "image")
    if raw is not None:
        buf = np.frombuffer(raw, np.uint8)
        if _IMREAD_COLOR_RGB is not None:
            image = cv2.imdecode(buf, _IMREAD_COLOR_RGB)
        else:
            image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if image is not None:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if image is None:
            raise UserError(
                f"{example_name(example_id)}: the image bytes could not be decoded; "
                "use JPEG, PNG, BMP, TIFF or WebP files"
            )
        return image
    if isinstance(data, PILImage.Image):
        return np.asarray(data if data.mode == "RGB" else data.convert("RGB"))
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise UserError(
                f"{example_name(example_id)}: the image array has dtype {data.dtype}; "
                "pass uint8 RGB pixels (0-255)"
            )
        if data.ndim == 2:
            return cv2.cvtColor(data, cv2.COLOR_GRAY2RGB)
        if data.ndim == 3 and data.shape[2] in (3, 4):
            return np.ascontiguousarray(data[:, :, :3])
        raise UserError(
            f"{example_name(example_id)}: the image array has shape {data.shape}; "
            "pass HxW grey, HxWx3 RGB or HxWx4 RGBA"
        )
    raise UserError(
        f"{example_name(example_id)}: cannot decode an image from {type(data).__name__}; "
        "pass encoded bytes, a PIL image or a numpy array"
    )


def decode_mask(data: Any, example_id: Any = None) -> np.ndarray:
    """Decode a segmentation annotation to an ``HxW`` integer array of class indices.

    Palette PNGs give their palette indices (as with PIL, not OpenCV's expansion to colour),
    16-bit PNGs give ``uint16``. An annotation with colour channels (an RGB PNG, a JPEG) or
    with non-integer values raises a :class:`~hooktrain.errors.UserError` naming the example.
    """
    raw = _encoded_bytes(data, example_id, "annotation")
    if raw is not None:
        if raw[:8] == _PNG_SIGNATURE and len(raw) > 25 and raw[25] == _PNG_PALETTE:
            mask = np.asarray(PILImage.open(io.BytesIO(raw)))
        else:
            mask = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
            if mask is None:
                raise UserError(
                    f"{example_name(example_id)}: the annotation bytes could not be decoded; "
                    "store masks as single-channel PNG files of class indices"
                )
    elif isinstance(data, PILImage.Image):
        mask = np.asarray(data)  # mode P gives indices, L uint8, I;16 uint16, RGB HxWx3
    elif isinstance(data, np.ndarray):
        mask = data
    else:
        raise UserError(
            f"{example_name(example_id)}: cannot decode an annotation from {type(data).__name__}; "
            "pass encoded PNG bytes, a PIL image or a numpy array"
        )
    return _check_mask(mask, example_id)


def _check_mask(mask: np.ndarray, example_id: Any) -> np.ndarray:
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        channels = mask.shape[2] if mask.ndim == 3 else None
        hint = ""
        if channels and channels >= 3 and all(
            np.array_equal(mask[:, :, 0], mask[:, :, c]) for c in (1, 2)
        ):
            hint = " (its colour channels are equal: save it as a greyscale PNG, mode L)"
        raise UserError(
            f"{example_name(example_id)}: the annotation has shape {mask.shape}, i.e. "
            f"{channels or mask.ndim} channels{hint}; segmentation masks must be single-channel "
            "integer images (PNG mode L, P or I;16) with one class index per pixel"
        )
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise UserError(
            f"{example_name(example_id)}: the annotation has dtype {mask.dtype}; "
            "segmentation masks must hold integer class indices"
        )
    return mask


class LabelMapper:
    """Apply ``reduce_zero_label``, then ``label_map``, then the out-of-range policy to a mask.

    Call it once per decoded mask (before the train or val transform). ``uint8`` masks go
    through one 256-entry lookup table; other integer masks through their unique values.
    The result is ``uint8`` when every mapped value fits, else ``int64``.

    ``out_of_range_pixels`` and ``out_of_range_examples`` accumulate what this instance has
    seen (per process: a DataLoader worker has its own copy); ``last_out_of_range`` is the
    count of the latest call, for a stream that reports per example.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        label_map: Mapping[int, int] | None = None,
        out_of_range: str = "error",
    ) -> None:
        if out_of_range not in _OUT_OF_RANGE_POLICIES:
            raise UserError(
                f"data.out_of_range is {out_of_range!r}{did_you_mean(out_of_range, _OUT_OF_RANGE_POLICIES)}; "
                "use 'error' or 'ignore'"
            )
        if num_classes < 1:
            raise UserError(f"data.num_classes is {num_classes}; set it to the number of classes (>= 1)")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.out_of_range = out_of_range
        self.out_of_range_pixels = 0
        self.out_of_range_examples = 0
        self.last_out_of_range = 0
        self._lut8, self._bad8 = self.map_values(np.arange(256))
        self._bad8_u8 = self._bad8.astype(np.uint8)
        self._any_bad8 = bool(self._bad8.any())
        # For "error" the bad entries never reach a mask (we raise), so the table may map
        # them to ignore too and stay uint8 whenever the valid labels fit.
        table = np.where(self._bad8, self.ignore_index, self._lut8)
        self._lut8_u8 = table.astype(np.uint8) if table.min() >= 0 and table.max() <= 255 else None

    def map_values(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map label values; returns ``(mapped int64, out_of_range bool)`` of ``values``' shape.

        Out-of-range values are returned as they map (not yet replaced by the ignore index).
        """
        out = np.asarray(values).astype(np.int64)
        if self.reduce_zero_label:
            zero_or_ignore = (out == 0) | (out == self.ignore_index)
            out = np.where(zero_or_ignore, self.ignore_index, out - 1)
        if self.label_map:
            before = out.copy()
            for old, new in self.label_map.items():
                out[before == old] = new
        bad = ((out < 0) | (out >= self.num_classes)) & (out != self.ignore_index)
        return out, bad

    def __call__(self, mask: np.ndarray, example_id: Any = None) -> np.ndarray:
        """Return the mapped mask; raise or count according to the out-of-range policy."""
        if mask.dtype == np.uint8 and self._lut8_u8 is not None:
            n_bad = cv2.countNonZero(cv2.LUT(mask, self._bad8_u8)) if self._any_bad8 else 0
            if n_bad and self.out_of_range == "error":
                counts = cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel()
                self._raise(np.flatnonzero(self._bad8 & (counts > 0)), n_bad, example_id)
            mapped = cv2.LUT(mask, self._lut8_u8)
        else:
            uniq, inverse = np.unique(mask, return_inverse=True)
            values, bad = self.map_values(uniq)
            n_bad = 0
            if bad.any():
                counts = np.bincount(inverse.ravel(), minlength=len(uniq))
                n_bad = int(counts[bad].sum())
                if self.out_of_range == "error":
                    self._raise(uniq[bad], n_bad, example_id)
                values = np.where(bad, self.ignore_index, values)
            mapped = values[inverse].reshape(mask.shape)
            if mapped.size == 0 or (mapped.min() >= 0 and mapped.max() <= 255):
                mapped = mapped.astype(np.uint8)
        self.last_out_of_range = n_bad
        if n_bad:
            self.out_of_range_pixels += n_bad
            self.out_of_range_examples += 1
        return mapped

    def _raise(self, raw_values: np.ndarray, n_bad: int, example_id: Any) -> None:
        shown = ", ".join(str(int(v)) for v in raw_values[:10])
        more = ", ..." if len(raw_values) > 10 else ""
        steps = [name for name, on in (("reduce_zero_label", self.reduce_zero_label),
                                       ("label_map", bool(self.label_map))) if on]
        after = f" after {' and '.join(steps)}" if steps else ""
        raise UserError(
            f"{example_name(example_id)}: {n_bad} annotation pixels with values [{shown}{more}] fall "
            f"outside [0, {self.num_classes}){after} and are not the ignore index "
            f"{self.ignore_index}; fix data.num_classes (or the label mapping), or set "
            "data.out_of_range: ignore to treat them as ignored"
        )
