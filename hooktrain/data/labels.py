"""From raw examples to arrays: image and mask decoding, and the label mapping of masks.

Decoding uses OpenCV's ``cv2.imdecode`` (libjpeg-turbo / libpng, about 1 ms for a 683x512
JPEG here), tifffile for TIFF (any number of bands, 8 or 16 bits) and ``numpy.load`` for
``.npy`` arrays (both recognised by their magic bytes, so parquet and Hub columns may hold
them too), and also accepts what ``datasets`` hands over: raw bytes, the
``{"bytes", "path"}`` dict of ``Image(decode=False)`` columns, PIL images and numpy arrays.
Images come out ``HxWxC`` ``uint8`` or ``uint16`` with C = ``data.in_channels``.

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

__all__ = ["WrongImage", "check_channels", "decode_image", "decode_mask", "example_name", "LabelMapper"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of an indexed (palette) PNG
# OpenCV >= 4.11 decodes straight to RGB, which saves a full-image cvtColor.
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_OUT_OF_RANGE_POLICIES = ("error", "ignore")
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# Any depth, any colour layout, EXIF orientation applied (JPEG, BMP, WebP with channels != 3).
_IMREAD_AS_STORED = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_PIL_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # PIL modes that convert("RGB") would clip
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


class WrongImage(UserError):
    """An image that decodes but does not fit the recipe (channel count, pixel type).

    Unlike an undecodable file it is never skipped as corrupt: every image of the dataset is
    likely the same, so the run stops with this one-line error.
    """


def decode_image(data: Any, example_id: Any = None, channels: int | None = 3) -> np.ndarray:
    """Decode an image to an ``HxWxC`` ``uint8`` or ``uint16`` array (never clipped to 8 bits).

    ``data`` is encoded bytes (JPEG, PNG, BMP, WebP, TIFF, ``.npy``), a ``{"bytes", "path"}``
    dict, a PIL image, or a ``uint8``/``uint16`` array (``HxW`` or ``HxWxC``). Colour images
    come in RGB(A) order; other channels in the order the file stores them.

    ``channels`` is the recipe's ``data.in_channels``: an image with another number of
    channels is a :class:`WrongImage` naming the fix. With 3, as before multi-channel support,
    8-bit files take OpenCV's RGB decoding (EXIF orientation applied, grey repeated to RGB,
    alpha dropped), and decoded grey or RGBA ``uint8`` arrays are made RGB the same way.
    ``None`` decodes the image as stored without checking (``hooktrain data check``).
    """
    raw = _encoded_bytes(data, example_id, "image")
    if raw is not None:
        image = _decode_image_bytes(raw, example_id, channels)
    elif isinstance(data, PILImage.Image):
        if channels == 3 and data.mode not in _PIL_WIDE_MODES:
            image = np.asarray(data if data.mode == "RGB" else data.convert("RGB"))
        else:
            image = _array_image(np.asarray(data), example_id, channels, legacy_rgb=False)
    elif isinstance(data, np.ndarray):
        image = _array_image(data, example_id, channels, legacy_rgb=True)
    else:
        raise UserError(
            f"{example_name(example_id)}: cannot decode an image from {type(data).__name__}; "
            "pass encoded bytes, a PIL image or a numpy array"
        )
    return check_channels(image, channels, example_id)


def _decode_image_bytes(raw: bytes, example_id: Any, channels: int | None) -> np.ndarray:
    """Encoded bytes to ``HxWxC``: ``.npy`` and TIFF by their magic numbers, the rest by OpenCV."""
    if raw[:6] == _NPY_MAGIC:
        return _array_image(_load_npy(raw, example_id), example_id, channels, legacy_rgb=False)
    if raw[:4] in _TIFF_MAGICS:
        tiff = _read_tiff(raw)
        if tiff is not None:
            return _array_image(tiff, example_id, channels, legacy_rgb=True)
    buf = np.frombuffer(raw, np.uint8)
    if channels == 3 and not _is_wide_png(raw):
        image = _imdecode_rgb(buf)  # the fast 8-bit RGB path
    else:
        flags = cv2.IMREAD_UNCHANGED if raw[:8] == _PNG_SIGNATURE or raw[:4] in _TIFF_MAGICS else _IMREAD_AS_STORED
        image = cv2.imdecode(buf, flags)
        if image is not None:
            image = _opencv_to_rgb_order(image)
            image = _array_image(image, example_id, channels, legacy_rgb=True)
    if image is None:
        raise UserError(
            f"{example_name(example_id)}: the image bytes could not be decoded; "
            "use JPEG, PNG, BMP, TIFF, WebP or .npy files"
        )
    return image


def _imdecode_rgb(buf: np.ndarray) -> np.ndarray | None:
    """OpenCV's 8-bit RGB decoding (EXIF orientation applied), or None."""
    if _IMREAD_COLOR_RGB is not None:
        return cv2.imdecode(buf, _IMREAD_COLOR_RGB)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _is_wide_png(raw: bytes) -> bool:
    """A PNG of 16 bits per sample (IHDR bit depth), which OpenCV's RGB decoding cuts to 8."""
    return raw[:8] == _PNG_SIGNATURE and len(raw) > 24 and raw[24] == 16


def _opencv_to_rgb_order(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR / BGRA channel order to RGB / RGBA (other channel counts as they are)."""
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def _load_npy(raw: bytes, example_id: Any) -> np.ndarray:
    """A ``.npy`` file's array (no pickles)."""
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as err:
        raise UserError(
            f"{example_name(example_id)}: the .npy image could not be read ({err}); "
            "save it with numpy.save as an HxW or HxWxC uint8/uint16 array"
        ) from err


def _read_tiff(raw: bytes) -> np.ndarray | None:
    """A TIFF's first image as ``HxW`` or ``HxWxC`` (planar files are moved to channels
    last) with tifffile, or None when tifffile cannot read it (then OpenCV tries)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            series = tif.series[0]
            image, axes = series.asarray(), series.axes
    except Exception:  # noqa: BLE001 - a codec tifffile lacks, or a broken file: OpenCV decides
        return None
    if image.ndim == 3 and axes[-2:] == "YX":  # separate planes: C x H x W
        image = np.moveaxis(image, 0, -1)
    return np.ascontiguousarray(image)


def _array_image(image: np.ndarray, example_id: Any, channels: int | None, *, legacy_rgb: bool) -> np.ndarray:
    """A decoded array as ``HxWxC`` ``uint8``/``uint16``. With ``legacy_rgb`` and
    ``channels == 3`` a ``uint8`` grey image is repeated to RGB and RGBA loses its alpha."""
    if image.dtype not in (np.uint8, np.uint16):
        raise WrongImage(
            f"{example_name(example_id)}: the image has dtype {image.dtype}; images must be uint8 or "
            "uint16 (convert the data, e.g. scale floats to 0-65535 and store uint16)"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise WrongImage(
            f"{example_name(example_id)}: the image array has shape {image.shape}; "
            "store images as HxW or HxWxC arrays"
        )
    if legacy_rgb and channels == 3 and image.dtype == np.uint8 and image.shape[2] in (1, 4):
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.shape[2] == 1 else image[:, :, :3]
    return np.ascontiguousarray(image)


def check_channels(image: np.ndarray, channels: int | None, example_id: Any = None) -> np.ndarray:
    """``image`` (``HxWxC``) when it has ``channels`` channels (or ``channels`` is None);
    otherwise a :class:`WrongImage` naming both counts and the fix."""
    found = image.shape[2] if image.ndim == 3 else 1
    if channels is not None and found != channels:
        raise WrongImage(
            f"{example_name(example_id)}: the image has {found} channel{'s' * (found != 1)} "
            f"({image.dtype}) but data.in_channels is {channels}; set data.in_channels: {found} "
            "(and one data.mean / data.std value per channel)"
        )
    return image


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
        mask_scale: int = 1,
    ) -> None:
        if out_of_range not in _OUT_OF_RANGE_POLICIES:
            raise UserError(
                f"data.out_of_range is {out_of_range!r}{did_you_mean(out_of_range, _OUT_OF_RANGE_POLICIES)}; "
                "use 'error' or 'ignore'"
            )
        if num_classes < 1:
            raise UserError(f"data.num_classes is {num_classes}; set it to the number of classes (>= 1)")
        self.num_classes = int(num_classes)
        self.binary = self.num_classes == 1
        self.num_labels = 2 if self.binary else self.num_classes
        self.mask_scale = int(mask_scale)
        if self.mask_scale != 1 and not self.binary:
            raise UserError(
                f"data.mask_scale is {mask_scale} but data.num_classes is {num_classes}; mask_scale is for "
                "binary masks (num_classes: 1)"
            )
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
        unscaled = None
        if self.mask_scale != 1:  # binary 0/mask_scale masks: mask_scale is foreground, other values are wrong
            unscaled = (out != 0) & (out != self.mask_scale) & (out != self.ignore_index)
            out = np.where(out == self.mask_scale, 1, out)
        if self.reduce_zero_label:
            zero_or_ignore = (out == 0) | (out == self.ignore_index)
            out = np.where(zero_or_ignore, self.ignore_index, out - 1)
        if self.label_map:
            before = out.copy()
            for old, new in self.label_map.items():
                out[before == old] = new
        bad = ((out < 0) | (out >= self.num_labels)) & (out != self.ignore_index)
        if unscaled is not None:
            bad |= unscaled
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
        if self.binary:
            raise UserError(
                f"{example_name(example_id)}: {n_bad} annotation pixels of a binary mask hold values "
                f"[{shown}{more}]{after}, not 0, {self.mask_scale} or the ignore index {self.ignore_index}; "
                "binary masks (num_classes: 1) hold 0 and 1, or 0 and 255 with data.mask_scale: 255 "
                "(map other values with data.label_map, or set data.out_of_range: ignore)"
            )
        raise UserError(
            f"{example_name(example_id)}: {n_bad} annotation pixels with values [{shown}{more}] fall "
            f"outside [0, {self.num_classes}){after} and are not the ignore index "
            f"{self.ignore_index}; fix data.num_classes (or the label mapping), or set "
            "data.out_of_range: ignore to treat them as ignored"
        )
