"""Joint image/mask transforms of MMSegmentation's ADE20K pipeline, in OpenCV and numpy.

Train (mmseg order): RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad; with ``pipeline.resize: {type: shortest_edge_choice}``
the first step is RandomChoiceResize(ResizeShortestEdge) instead (mmseg's Mask2Former configs).
Val/test: Resize keeping ratio -> Normalize, with the ground-truth mask left at its original size.
Decoding and label mapping live in :mod:`hooktrain.data.labels` and are re-exported here.

Conventions
    ``scale`` is mmseg's ``(long, short)`` edge pair: an image is rescaled by
    ``min(long / long_edge, short / short_edge)`` (mmcv ``rescale_size``, sizes rounded
    half up). ``crop_size`` is ``(h, w)``. Images are ``HxWx3`` ``uint8`` RGB (other channel
    counts and ``uint16``: see below); masks ``HxW``
    integer class indices with ``ignore_index`` (255) for "not scored".

Randomness
    Every draw comes from the ``numpy.random.Generator`` passed to ``TrainTransform.__call__``,
    in mmseg's order, so the stream can derive it from ``(seed, epoch, index)`` and resume
    exactly: ratio ``random()`` (shortest_edge_choice: the scale's index ``integers(len(scales))``,
    numpy's ``randint`` in mmcv's RandomChoiceResize); crop ``integers(0, margin_h+1)``, ``integers(0, margin_w+1)``
    per try; flip ``random() < flip_prob``; photometric: brightness coin + ``uniform``, mode
    coin, [contrast coin + ``uniform``], saturation coin + ``uniform``, hue coin +
    ``integers(-hue_delta, hue_delta)`` (upper bound exclusive, as numpy's ``randint`` in
    mmseg), [contrast coin + ``uniform``]. No global RNG is touched.

Why OpenCV rather than torchvision.transforms.v2
    The project standard is tv2 unless OpenCV is measurably faster, and it is:
    ``bench/data_pipeline.py`` (683x512 JPEG of ~105 KB + PNG mask, bytes to padded tensors, one
    thread) runs this module, a plain tv2 implementation of the same steps and MMSegmentation
    1.2.2's own pipeline (in its environment) in interleaved rounds; docs/benchmarks.md has the
    figures from ``bench/results/data_pipeline.json``. Decoding alone
    (cv2.imdecode, JPEG + PNG) is a third or more of the time. The big items: tv2 hue jitter on
    ``uint8`` tensors costs ~19 ms per 512x512 crop against ~0.9 ms for OpenCV's HSV round
    trip; mmseg's ``np.unique`` in the cat_max_ratio check costs several ms per try against
    ~0.1 ms for ``cv2.calcHist``. The rest of the speed comes from:

    * brightness/contrast (mmseg's ``convert``: float32 multiply-add, clip to 0..255, truncate
      to uint8) are per-value maps, so they are 256-entry tables; consecutive ones are
      composed into one table, and whatever is still pending after the HSV steps is folded
      into the per-channel float32 normalisation table, so ``Normalize`` and the trailing
      contrast cost one ``cv2.LUT`` per channel, written straight into the padded CHW output;
    * photometric work happens on the 512x512 crop (mmseg's order already puts it there);
    * saturation and hue each keep their own HSV round trip, as mmseg does: merging them
      into one would save ~0.2 ms per image on average but change pixels, and this module is
      bit-exact with MMSegmentation 1.2.2's own transforms and data preprocessor
      (tests/data/test_transforms.py runs them in their own environment with the same draws).

Other channel counts and 16-bit images
    The above is the path of ``uint8`` RGB images (``data.in_channels: 3``). Images of another
    channel count (``HxWxC``, any C) or of ``uint16`` take a general path with the same steps
    and the same draws: ``uint16`` images become ``float32`` before resizing (exact for every
    16-bit value), so no precision is lost before ``Normalize``, which is then
    ``(x - mean_c) / std_c`` in float32; ``uint8`` images keep OpenCV's 8-bit resize and the
    per-channel normalisation tables. PhotoMetricDistortion is defined on 8-bit RGB: it
    applies to the first three channels of a ``uint8`` image (taken as RGB; the others pass
    unchanged) and refuses ``uint16`` images and fewer than three channels.

On the device (``data.train.gpu_augment``)
    :meth:`TrainTransform.uint8_crop` stops after the flip: it returns the padded ``uint8``
    crop and the PhotoMetricDistortion draws (:func:`draw_photometric`, the same calls in the
    same order as the CPU path, so both paths draw the same values for an example), and
    :mod:`hooktrain.data.device_augment` applies them and the normalisation batched on the
    training device. 8-bit images only.

Threads
    OpenCV's own thread pool fights with DataLoader workers, so OpenCV runs single-threaded:
    the main process makes it so before DataLoader workers fork (they inherit it), and a
    transform used in any other process does on its first call; see
    :func:`limit_opencv_threads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from hooktrain.data.device_augment import PHOTOMETRIC_FIELDS
from hooktrain.data.labels import LabelMapper, decode_image, decode_mask
from hooktrain.errors import UserError
from hooktrain.recipe.data import TrainPipelineConfig, ValPipelineConfig

__all__ = [
    "TrainPipelineConfig",
    "ValPipelineConfig",
    "TrainTransform",
    "ValTransform",
    "PhotometricDraws",
    "draw_photometric",
    "LabelMapper",
    "decode_image",
    "decode_mask",
    "rescaled_size",
    "scaled_size",
    "shortest_edge_size",
    "limit_opencv_threads",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_MAX_CROP_TRIES = 10  # mmseg RandomCrop: 10 checked crops, then one more unchecked draw


def rescaled_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """``(new_h, new_w)`` of an image rescaled keeping ratio to fit ``scale = (long, short)``.

    mmcv ``rescale_size``: factor ``min(long / max(h, w), short / min(h, w))``, each side
    ``int(side * factor + 0.5)``.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """``(new_h, new_w)`` of mmcv ``Resize(scale_factor=factor, keep_ratio=True)``.

    mmcv first takes the target ``(int(w * factor + 0.5), int(h * factor + 0.5))``, then fits
    the image into it keeping ratio (:func:`rescaled_size`), which can move a side by a pixel.
    """
    target = (int(width * factor + 0.5), int(height * factor + 0.5))
    if min(target) < 1:
        raise UserError(
            f"an image of {height}x{width} scaled by {factor} is empty; "
            "use larger factors in model.inference.scales"
        )
    return rescaled_size(height, width, target)


def shortest_edge_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of mmseg ``ResizeShortestEdge(scale=short_edge, max_size)``.

    Its target: the short side ``short_edge``, the long side following the aspect ratio, both
    multiplied by ``max_size / long`` when the long side exceeds ``max_size``, each then rounded
    half up as ``(w, h)``; mmcv's keep-ratio Resize fits the image into that target
    (:func:`rescaled_size`), which can move a side by a pixel (300x2000 at 1024, max 2048: target
    2048x307, image 2047x307). Same float operations, in the same order, as mmseg 1.2.2's.
    """
    size = short_edge * 1.0
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h *= scale
        new_w *= scale
    return rescaled_size(height, width, (int(new_w + 0.5), int(new_h + 0.5)))


def limit_opencv_threads() -> None:
    """Make OpenCV single-threaded in the calling process (cheap once it is).

    Parallelism comes from DataLoader workers; OpenCV's pool on top oversubscribes the cores.
    The train stream and the val loader call it in the main process before their workers
    fork (:func:`hooktrain.data.reading.loader_options`), so the workers start with one OpenCV
    thread and never reconfigure a pool: a forked child that does (``cv2.setNumThreads``)
    while the parent's pool threads ran hangs for ever (OpenCV 5.1's pthreads backend).
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def _convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion.convert`` as a 256-entry table: float32, clip, truncate."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _normalise_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[C, 256]`` float32: ``(v - mean_c) / std_c`` for every uint8 value, per channel."""
    if len(mean) != len(std) or min(std) <= 0:
        raise UserError(
            f"data.mean and data.std need one value per channel each, with std > 0; got {list(mean)} and {list(std)}"
        )
    values = np.arange(256, dtype=np.float32)
    mean32 = np.asarray(mean, np.float32)[:, None]
    std32 = np.asarray(std, np.float32)[:, None]
    return np.ascontiguousarray((values[None, :] - mean32) / std32)


@dataclass(frozen=True)
class PhotometricDraws:
    """One image's PhotoMetricDistortion parameters; None: the step is not applied."""

    brightness: float | None  # delta added
    contrast_first: bool  # mmseg's mode 1: contrast before saturation and hue
    contrast: float | None  # alpha
    saturation: float | None  # alpha on HSV S
    hue: int | None  # shift of HSV H, OpenCV units (0..179)

    def as_row(self) -> np.ndarray:
        """float32 ``[len(PHOTOMETRIC_FIELDS)]``: flags 1/0, neutral values where not applied."""

        def step(value, neutral):
            return (0.0, neutral) if value is None else (1.0, value)

        row = (
            *step(self.brightness, 0.0),
            float(self.contrast_first),
            *step(self.contrast, 1.0),
            *step(self.saturation, 1.0),
            *step(self.hue, 0),
        )
        assert len(row) == len(PHOTOMETRIC_FIELDS)
        return np.asarray(row, np.float32)


NO_PHOTOMETRIC = PhotometricDraws(None, False, None, None, None)


def draw_photometric(rng: np.random.Generator, cfg: TrainPipelineConfig) -> PhotometricDraws:
    """PhotoMetricDistortion's draws in mmseg's order (see the module docstring): brightness
    coin + uniform, mode coin, [contrast], saturation coin + uniform, hue coin + integer,
    [contrast]. Both the CPU path and ``gpu_augment`` take them from here."""
    brightness = rng.uniform(-cfg.brightness_delta, cfg.brightness_delta) if rng.integers(2) else None
    contrast_first = rng.integers(2) == 1
    contrast = rng.uniform(*cfg.contrast_range) if contrast_first and rng.integers(2) else None
    saturation = rng.uniform(*cfg.saturation_range) if rng.integers(2) else None
    hue = None
    if rng.integers(2):
        # mmseg's randint(-0, 0) would raise; hue_delta=0 simply means no shift
        hue = int(rng.integers(-cfg.hue_delta, cfg.hue_delta)) if cfg.hue_delta else 0
    if not contrast_first and rng.integers(2):
        contrast = rng.uniform(*cfg.contrast_range)
    return PhotometricDraws(brightness, bool(contrast_first), contrast, saturation, hue)


def _check_image(image: np.ndarray, example_id: Any, channels: int = 3) -> None:
    if not (
        isinstance(image, np.ndarray)
        and image.dtype in (np.uint8, np.uint16)
        and image.ndim == 3
        and image.shape[2] == channels
    ):
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise UserError(
            f"example {example_id!r}: the transform got an image of {desc}; decode it with "
            f"hooktrain.data.transforms.decode_image (HxWx{channels} uint8 or uint16, data.in_channels: {channels})"
        )


def _fast(image: np.ndarray) -> bool:
    """Whether ``image`` takes the mmseg-exact 8-bit RGB path."""
    return image.dtype == np.uint8 and image.shape[2] == 3


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``(h, w)`` of an ``HxWxC`` image, kept ``HxWxC`` (OpenCV drops a
    trailing axis of 1); ``uint16`` is resized in float32, so no value is rounded."""
    if image.dtype == np.uint16:
        image = image.astype(np.float32)
    out = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(size[0], size[1], image.shape[2])


def _normalise_any_into(image: np.ndarray, table: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray):
    """Write the normalised ``HxWxC`` image into ``out[:, :h, :w]``: per-channel tables for
    ``uint8``, ``(x - mean_c) / std_c`` in float32 otherwise."""
    h, w = image.shape[:2]
    if image.dtype == np.uint8:
        for c in range(image.shape[2]):
            cv2.LUT(np.ascontiguousarray(image[:, :, c]), table[c], dst=out[c, :h, :w])
        return
    values = np.subtract(image, mean, dtype=np.float32)
    np.divide(values, std, out=values)
    out[:, :h, :w] = values.transpose(2, 0, 1)


def _check_pair(image: np.ndarray, mask: np.ndarray, example_id: Any, channels: int = 3) -> np.ndarray:
    """Validate the pair; return the mask in a dtype OpenCV resizes (int64 becomes int32)."""
    _check_image(image, example_id, channels)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise UserError(
            f"example {example_id!r}: the transform got a mask of {mask.dtype} {mask.shape}; "
            "decode it with decode_mask (HxW integer class indices)"
        )
    if mask.shape != image.shape[:2]:
        raise UserError(
            f"example {example_id!r}: the image is {image.shape[0]}x{image.shape[1]} but its annotation is "
            f"{mask.shape[0]}x{mask.shape[1]}; every mask must have its image's height and width"
        )
    if mask.dtype == np.int64 or mask.dtype == np.uint32:
        mask = mask.astype(np.int32)
    return mask


def _normalise_into(image: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """Write ``table[c][image[..., c]]`` into ``out[c, :h, :w]`` (the padding stays as is)."""
    h, w = image.shape[:2]
    for c, channel in enumerate(cv2.split(image)):
        cv2.LUT(channel, table[c], dst=out[c, :h, :w])


class TrainTransform:
    """RandomResize, RandomCrop with cat_max_ratio, flip, PhotoMetricDistortion, Normalize, Pad.

    ``__call__(image, mask, rng)`` takes an ``HxWxC`` uint8 or uint16 image (C =
    ``in_channels``, default: one per ``mean`` value), its ``HxW`` integer mask (already
    label-mapped) and a ``numpy.random.Generator``, and returns
    ``(float32 tensor [C, crop_h, crop_w], int64 tensor [crop_h, crop_w])``: the image
    normalised with ``mean``/``std`` and padded with 0 at the bottom/right, the mask padded
    with ``ignore_index``. For uint8 RGB, bit-exact with mmseg's pipeline given the same draws.
    """

    def __init__(
        self,
        cfg: TrainPipelineConfig,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
        in_channels: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.ignore_index = int(ignore_index)
        self.channels = len(mean) if in_channels is None else int(in_channels)
        if len(mean) != self.channels:
            raise UserError(
                f"data.mean has {len(mean)} values but in_channels is {self.channels}; give one per channel"
            )
        if cfg.photometric and self.channels < 3:
            raise UserError(_photometric_refusal(f"the images have {self.channels} channel(s), not RGB"))
        self._norm = _normalise_table(mean, std)
        self._mean32 = np.asarray(mean, np.float32)
        self._std32 = np.asarray(std, np.float32)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, example_id: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._geometry(image, mask, rng, example_id)
        table = self._norm
        if self.cfg.photometric:
            if _fast(image):
                image, pending = self._photometric(image, rng)
                if pending is not None:
                    table = np.ascontiguousarray(table[:, pending])
            else:
                image, table = self._photometric_rgb_bands(image, table, rng)
        return self._normalise_and_pad(image, mask, table)

    def uint8_crop(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, example_id: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The ``data.train.gpu_augment`` half of ``__call__``: the same draws, but the image
        stops after the flip. Returns ``(uint8 tensor [C, crop_h, crop_w] padded with 0, mask
        [crop_h, crop_w] padded with ignore_index (uint8 when labels and ignore_index fit, an
        eighth of int64's bytes to hand over; else int64), float32 [9] photometric draws
        (:meth:`PhotometricDraws.as_row`; all flags 0 without ``photometric``), (h, w) of the
        crop before padding)``. 8-bit images only."""
        image, mask = self._geometry(image, mask, rng, example_id, gpu_augment=True)
        draws = draw_photometric(rng, self.cfg) if self.cfg.photometric else NO_PHOTOMETRIC
        crop_h, crop_w = self.cfg.crop_size
        h, w = image.shape[:2]
        out = np.zeros((self.channels, crop_h, crop_w), np.uint8)
        out[:, :h, :w] = image.transpose(2, 0, 1)
        small = mask.dtype == np.uint8 and 0 <= self.ignore_index <= 255
        mask = self._pad_mask(mask, np.uint8 if small else np.int64)
        return torch.from_numpy(out), mask, torch.from_numpy(draws.as_row()), (h, w)

    def _geometry(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, example_id: Any, gpu_augment: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Checks, RandomResize, RandomCrop and RandomFlip (their draws, in mmseg's order)."""
        limit_opencv_threads()
        mask = _check_pair(image, mask, example_id, self.channels)
        if gpu_augment and image.dtype != np.uint8:
            raise UserError(
                f"data.train.gpu_augment works on 8-bit images, but example {example_id!r} is {image.dtype}; "
                "set gpu_augment: false"
            )
        if self.cfg.photometric and image.dtype != np.uint8:
            raise UserError(_photometric_refusal(f"example {example_id!r} is {image.dtype}, not 8-bit"))
        image, mask = self._random_resize(image, mask, rng)
        y, x = self._crop_origin(mask, rng)
        crop_h, crop_w = self.cfg.crop_size
        image = image[y : y + crop_h, x : x + crop_w]
        mask = mask[y : y + crop_h, x : x + crop_w]
        if rng.random() < self.cfg.flip_prob:
            image, mask = cv2.flip(image, 1).reshape(image.shape), cv2.flip(mask, 1)
        return image, mask

    def _photometric_rgb_bands(self, image: np.ndarray, table: np.ndarray, rng: np.random.Generator):
        """PhotoMetricDistortion of a uint8 image of more than 3 channels: on the first three,
        taken as RGB; the others pass unchanged. Returns the image and its normalisation table."""
        rgb, pending = self._photometric(np.ascontiguousarray(image[:, :, :3]), rng)
        image = np.concatenate([rgb, image[:, :, 3:]], axis=2)
        if pending is not None:
            table = table.copy()
            table[:3] = table[:3][:, pending]
        return image, table

    def _random_resize(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """RandomResize of ``scale`` x a ratio, or with ``cfg.resize`` RandomChoiceResize(ResizeShortestEdge)."""
        if self.cfg.resize is not None:
            scales = self.cfg.resize.scales
            short_edge = scales[int(rng.integers(len(scales)))]
            new_h, new_w = shortest_edge_size(image.shape[0], image.shape[1], short_edge, self.cfg.resize.max_size)
        else:
            lo, hi = self.cfg.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            scale = (int(self.cfg.scale[0] * ratio), int(self.cfg.scale[1] * ratio))
            new_h, new_w = rescaled_size(image.shape[0], image.shape[1], scale)
        if (new_h, new_w) == image.shape[:2]:
            return image, mask
        if _fast(image):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        else:
            image = _resize(image, (new_h, new_w))
        mask = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        return image, mask

    def _crop_origin(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        crop_h, crop_w = self.cfg.crop_size
        margin_h = max(mask.shape[0] - crop_h, 0)
        margin_w = max(mask.shape[1] - crop_w, 0)

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

        y, x = draw()
        if self.cfg.cat_max_ratio < 1.0:
            for _ in range(_MAX_CROP_TRIES):
                if self._balanced(mask[y : y + crop_h, x : x + crop_w]):
                    break
                y, x = draw()
        return y, x

    def _balanced(self, crop: np.ndarray) -> bool:
        """mmseg's test: more than one labelled class and none with >= cat_max_ratio of them."""
        if crop.dtype == np.uint8:
            counts = cv2.calcHist([crop], [0], None, [256], [0, 256]).ravel()
            if self.ignore_index < 256:
                counts[self.ignore_index] = 0
            counts = counts[counts > 0]
        else:
            labels, counts = np.unique(crop, return_counts=True)
            counts = counts[labels != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cfg.cat_max_ratio

    def _photometric(self, image: np.ndarray, rng: np.random.Generator):
        """mmseg PhotoMetricDistortion. Returns the uint8 image and the per-value table still
        to apply (or None); the caller folds that table into the normalisation."""
        pending: np.ndarray | None = None

        def then(table: np.ndarray) -> None:
            nonlocal pending
            pending = table if pending is None else table[pending]

        def flush(img: np.ndarray) -> np.ndarray:
            nonlocal pending
            if pending is not None:
                img, pending = cv2.LUT(img, pending), None
            return img

        draws = draw_photometric(rng, self.cfg)
        if draws.brightness is not None:
            then(_convert_table(beta=draws.brightness))
        if draws.contrast_first and draws.contrast is not None:
            then(_convert_table(alpha=draws.contrast))
        if draws.saturation is not None:
            image = self._hsv_channel_lut(flush(image), 1, _convert_table(alpha=draws.saturation))
        if draws.hue is not None:
            hue = ((np.arange(256) + draws.hue) % 180).astype(np.uint8)
            image = self._hsv_channel_lut(flush(image), 0, hue)
        if not draws.contrast_first and draws.contrast is not None:
            then(_convert_table(alpha=draws.contrast))
        return image, pending

    @staticmethod
    def _hsv_channel_lut(image: np.ndarray, channel: int, table: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, channel] = cv2.LUT(hsv[:, :, channel], table)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def _normalise_and_pad(self, image: np.ndarray, mask: np.ndarray, table: np.ndarray):
        crop_h, crop_w = self.cfg.crop_size
        h, w = image.shape[:2]
        padded = (h, w) != (crop_h, crop_w)
        out = (np.zeros if padded else np.empty)((self.channels, crop_h, crop_w), np.float32)
        if _fast(image):
            _normalise_into(image, table, out)
        else:
            _normalise_any_into(image, table, self._mean32, self._std32, out)
        return torch.from_numpy(out), self._pad_mask(mask)

    def _pad_mask(self, mask: np.ndarray, dtype: type = np.int64) -> torch.Tensor:
        """``[crop_h, crop_w]`` of ``dtype``: the mask, padded with ``ignore_index`` at the bottom/right."""
        crop_h, crop_w = self.cfg.crop_size
        h, w = mask.shape[:2]
        if (h, w) == (crop_h, crop_w):
            return torch.from_numpy(mask.astype(dtype, copy=False))
        out_mask = np.full((crop_h, crop_w), self.ignore_index, dtype)
        out_mask[:h, :w] = mask
        return torch.from_numpy(out_mask)


def _photometric_refusal(why: str) -> str:
    """The one-line refusal of PhotoMetricDistortion on images that are not 8-bit RGB."""
    return (
        f"data.train.pipeline.photometric: mmseg's PhotoMetricDistortion works on 8-bit RGB, but {why}; "
        "set photometric: false"
    )


class ValTransform:
    """Val/test: resize the image keeping ratio to ``cfg.scale``, normalise; mask untouched.

    ``__call__(image, mask)`` takes an ``HxWxC`` uint8 or uint16 image (C = ``in_channels``,
    default: one per ``mean`` value; see :class:`TrainTransform` for C != 3 and uint16) and
    returns ``(float32 tensor [C, h, w], int64 tensor [H, W])`` where
    ``(h, w) = rescaled_size(H, W, cfg.scale)`` and the mask keeps the original ``H x W``
    (metrics are computed at the original size, as in mmseg). ``mask`` may be None
    (prediction without ground truth); then the second element is None. ``rescaled`` gives
    the multi-scale test's images (``model.inference.scales``).
    """

    def __init__(
        self,
        cfg: ValPipelineConfig,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.channels = len(mean) if in_channels is None else int(in_channels)
        if len(mean) != self.channels:
            raise UserError(
                f"data.mean has {len(mean)} values but in_channels is {self.channels}; give one per channel"
            )
        self._norm = _normalise_table(mean, std)
        self._mean32 = np.asarray(mean, np.float32)
        self._std32 = np.asarray(std, np.float32)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None, *, example_id: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        limit_opencv_threads()
        if mask is None:
            _check_image(image, example_id, self.channels)
        else:
            mask = _check_pair(image, mask, example_id, self.channels)
        size = rescaled_size(image.shape[0], image.shape[1], self.cfg.scale)
        out = self._resize_normalise(image, size)
        return out, None if mask is None else torch.from_numpy(mask.astype(np.int64))

    def rescaled(self, image: np.ndarray, factor: float, *, example_id: Any = None) -> torch.Tensor:
        """The image resized by ``factor`` as mmcv ``Resize(scale_factor=factor, keep_ratio=True)``
        (see :func:`scaled_size`) instead of to ``cfg.scale``, normalised: float32 [C, h, w]."""
        limit_opencv_threads()
        _check_image(image, example_id, self.channels)
        return self._resize_normalise(image, scaled_size(image.shape[0], image.shape[1], factor))

    def normalised(self, image: np.ndarray, *, example_id: Any = None) -> torch.Tensor:
        """The image normalised at its own size, without the pipeline's resize: float32
        [C, h, w]. ``hooktrain predict`` runs raster tiles through this, at native resolution."""
        limit_opencv_threads()
        _check_image(image, example_id, self.channels)
        return self._resize_normalise(image, image.shape[:2])

    def _resize_normalise(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        new_h, new_w = size
        fast = _fast(image)
        if (new_h, new_w) != image.shape[:2]:
            if fast:
                image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            else:
                image = _resize(image, size)
        out = np.empty((self.channels, new_h, new_w), np.float32)
        if fast:
            _normalise_into(image, self._norm, out)
        else:
            _normalise_any_into(image, self._norm, self._mean32, self._std32, out)
        return torch.from_numpy(out)


def pad_stack(tensors: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """``[..., h_i, w_i]`` tensors as one ``[B, ..., h, w]`` batch at the largest height and
    width, each padded bottom / right with ``value`` (0 for images, the ignore index for
    masks): the val loader's collation and ``Segmenter``'s batches."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    batch = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), value)
    for i, t in enumerate(tensors):
        batch[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return batch
