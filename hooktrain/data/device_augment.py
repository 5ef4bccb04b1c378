"""PhotoMetricDistortion and normalisation batched on the training device (``data.train.gpu_augment``).

With ``gpu_augment: true`` the DataLoader workers stop after resize, crop, flip and pad
(:meth:`hooktrain.data.transforms.TrainTransform.uint8_crop`) and hand over, per batch,
``"image"``: uint8 ``[B, C, H, W]`` padded with 0, ``"image_sizes"``: int64 ``[B, 2]`` (each
crop's height and width before padding) and ``"photometric"``: float32 ``[B, 9]``, each image's
PhotoMetricDistortion draws, taken on the worker side from the example's own generator in
mmseg's order (:func:`hooktrain.data.transforms.draw_photometric`, the same call the CPU path
makes, so the draws, their distribution and exact resume are those of ``gpu_augment: false``).
The columns are :data:`PHOTOMETRIC_FIELDS`; a step that is not applied has flag 0 and a
neutral value (delta 0, alpha 1, shift 0). With ``pipeline.photometric: false`` every flag is 0.

:func:`photometric_normalise` then applies, per image and batched (one pass over the batch
per step, no Python loop over images or pixels), MMSegmentation 1.2.2's PhotoMetricDistortion
in its order: brightness, contrast (mode "first"), saturation, hue, contrast (mode "last"),
then ``(x - mean) / std``, and leaves 0 in the padding, as the CPU path does.

How close to the CPU (OpenCV) path it is. OpenCV picks its colour kernels by the CPU at run
time (SSE2, AVX2 or AVX-512 steps of 16, 32 or 64 pixels, with or without fused multiply-add,
each row's last pixels converted one by one and rounded), so its own output differs by a uint8
step between machines; this module follows its vector loop and states bounds that hold on
every CPU (tests/data/test_device_augment.py checks them against OpenCV's optimised and its
``cv2.setUseOptimized(False)`` path):
    * brightness and contrast are mmseg's ``convert``: float32 multiply or add, clip to
      0..255, truncate to uint8. Exact (IEEE float32, no OpenCV kernel).
    * RGB -> HSV is OpenCV's 8-bit ``cvtColor(COLOR_RGB2HSV)`` integer arithmetic (its
      fixed-point division tables with a 12-bit shift, H in 0..179, S and V in 0..255),
      ported as such. Exact for all 2^24 colours.
    * the saturation table (``convert`` on S) and the hue shift (``(H + shift) % 180``). Exact.
    * HSV -> RGB is OpenCV's 8-bit ``COLOR_HSV2RGB`` vector loop: float32 (H times
      ``6 / 180``, S and V times ``1 / 255``, the sector formula with ``1 - s * f`` as one
      fused multiply-add), times 255 and truncated. Equal to OpenCV in its AVX2 and AVX-512
      vector steps; within **1 uint8 step** of any OpenCV path for the same HSV input (row
      tails, which OpenCV rounds; builds without the fused multiply-add).
    * normalisation is ``(x - mean_c) / std_c`` in float32, the values of the CPU path's tables.
A hue step after a saturation step receives that 1-step difference, which can move OpenCV's
rounded H by one unit (2 degrees: up to ``255 * 6 / 180``, 9 uint8 steps for a bright saturated
colour) and S by one: whole draws stay within 11 uint8 steps, 17 when a contrast step of up to
1.5 follows (:func:`opencv_step_bound`). In the pixels OpenCV's AVX2 or AVX-512 vector loop
converts (every pixel of rows whose width is a multiple of 64, such as 512x512 crops) it is
OpenCV's output bit for bit. docs/benchmarks.md ("augment_exactness") has the measurements.

Images of more than three channels (``uint8``) get the distortion on the first three, taken
as RGB, as on the CPU; the other channels are only normalised. 16-bit images are refused on
the worker side (``gpu_augment`` needs 8-bit images).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "PHOTOMETRIC_FIELDS",
    "photometric_normalise",
    "photometric_distort",
    "opencv_step_bound",
    "rgb_to_hsv",
    "hsv_to_rgb",
]

PHOTOMETRIC_FIELDS = (
    "brightness",  # 1: add brightness_delta
    "brightness_delta",
    "contrast_first",  # 1: mmseg's mode 1 (contrast before saturation and hue), 0: after hue
    "contrast",  # 1: multiply by contrast_alpha
    "contrast_alpha",
    "saturation",  # 1: multiply HSV saturation by saturation_alpha
    "saturation_alpha",
    "hue",  # 1: add hue_shift to H (OpenCV's 0..179 units), modulo 180
    "hue_shift",
)
(BRIGHTNESS, BRIGHTNESS_DELTA, CONTRAST_FIRST, CONTRAST, CONTRAST_ALPHA,
 SATURATION, SATURATION_ALPHA, HUE, HUE_SHIFT) = range(len(PHOTOMETRIC_FIELDS))  # fmt: skip

_HSV_SHIFT = 12  # OpenCV's fixed-point shift in 8-bit RGB -> HSV
_H_SCALE = np.float32(6.0) / np.float32(180.0)  # OpenCV HSV2RGB_b: hscale = 6.0f / hrange
_INV_255 = np.float32(1.0) / np.float32(255.0)
# OpenCV's sector table: which of (v, v(1-s), v(1-sf), v(1-s(1-f))) r, g and b take per sector.
_SECTORS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))
_STEPS = (BRIGHTNESS, CONTRAST, SATURATION, HUE)
HSV_STEP = 1  # uint8 steps: HSV -> RGB against any OpenCV kernel, for the same input
HUE_UNIT_STEPS = 9  # ceil(255 * 6 / 180): one unit of OpenCV's 8-bit H on a saturated colour


@functools.cache
def _division_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``sdiv_table`` and ``hdiv_table180``: ``round(255 * 2^12 / i)`` and
    ``round(180 * 2^12 / (6 i))`` for i in 1..255, 0 at 0 (int32, on ``device``)."""
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.rint((255 << _HSV_SHIFT) / i), 0)
        hdiv = np.where(i > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * i)), 0)
    return (
        torch.from_numpy(sdiv.astype(np.int32)).to(device),
        torch.from_numpy(hdiv.astype(np.int32)).to(device),
    )


def _descale(x: torch.Tensor) -> torch.Tensor:
    """``(x + 2^11) >> 12`` with an arithmetic shift (floor), as OpenCV's ``CV_DESCALE``."""
    return torch.div(x + (1 << (_HSV_SHIFT - 1)), 1 << _HSV_SHIFT, rounding_mode="floor")


def rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's 8-bit ``COLOR_RGB2HSV`` of ``[..., 3, H, W]`` values 0..255 (any dtype holding
    integers): ``(h, s, v)`` int32 ``[..., 1, H, W]``, H in 0..179."""
    r, g, b = rgb.to(torch.int32).split(1, dim=-3)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv, hdiv = _division_tables(rgb.device)
    s = _descale(diff * sdiv[v])
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = _descale(h * hdiv[diff])
    h = torch.where(h < 0, h + 180, h)
    return h, s, v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit ``COLOR_HSV2RGB`` of H in 0..179, S and V in 0..255 (``[..., 1, H, W]``
    each): float32 ``[..., 3, H, W]`` holding integers 0..255.

    As OpenCV's x86-64 vector loop computes it: float32, ``1 - s * f`` fused (one rounding, as
    its compiler contracts it), the result times 255 truncated. Within one uint8 step of every
    OpenCV path (see the module's docstring).
    """
    hue = h.to(torch.float32) * float(_H_SCALE)
    sat = s.to(torch.float32) * float(_INV_255)
    val = v.to(torch.float32) * float(_INV_255)
    sector = hue.trunc()
    frac = hue - sector
    tabs = torch.stack([val, val * (1 - sat), val * _one_minus(sat, frac), val * _one_minus(sat, 1 - frac)])
    sector = sector.to(torch.int64).clamp_(0, 5)
    rgb = tabs.gather(0, _sector_table(h.device)[:, sector])
    return torch.cat(list(rgb), dim=-3).mul_(255).trunc_().clamp_(0, 255)


def _one_minus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - a * b`` of float32 values rounded once, as a fused multiply-add: the product is
    exact in float64."""
    return (1 - a.to(torch.float64) * b.to(torch.float64)).to(torch.float32)


@functools.cache
def _sector_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SECTORS, device=device)


def _convert(x: torch.Tensor, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> torch.Tensor:
    """mmseg's ``convert``: ``x * alpha + beta`` in float32, clipped to 0..255, truncated."""
    if alpha is not None:
        x = x * alpha
    if beta is not None:
        x = x + beta
    return x.clamp(0, 255).trunc_()


def _saturation(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    h, s, v = rgb_to_hsv(rgb)
    return hsv_to_rgb(h, _convert(s.to(torch.float32), alpha=alpha), v)


def _hue(rgb: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    h, s, v = rgb_to_hsv(rgb)
    return hsv_to_rgb(torch.remainder(h + shift.to(torch.int32), 180), s, v)


def photometric_distort(
    rgb: torch.Tensor,
    params: torch.Tensor,
    steps: Sequence[bool] = (True,) * 4,
) -> torch.Tensor:
    """PhotoMetricDistortion of float32 ``[B, 3, H, W]`` integers 0..255 (RGB) with each image's
    ``params`` row (:data:`PHOTOMETRIC_FIELDS`); returns float32 integers 0..255. Every step is
    computed for the whole batch and kept where the image's flag is set; ``steps`` (brightness,
    contrast, saturation, hue) may say that no image of the batch has one, to skip its work."""
    params = params.to(device=rgb.device, dtype=torch.float32)

    def column(i: int) -> torch.Tensor:
        return params[:, i].view(-1, 1, 1, 1)

    def applied(i: int) -> torch.Tensor:
        return column(i) > 0.5

    brightness, contrast, saturation, hue = steps
    first = applied(CONTRAST_FIRST)
    x = torch.where(applied(BRIGHTNESS), _convert(rgb, beta=column(BRIGHTNESS_DELTA)), rgb) if brightness else rgb
    if contrast:
        x = torch.where(applied(CONTRAST) & first, _convert(x, alpha=column(CONTRAST_ALPHA)), x)
    if saturation:
        x = torch.where(applied(SATURATION), _saturation(x, column(SATURATION_ALPHA)), x)
    if hue:
        x = torch.where(applied(HUE), _hue(x, column(HUE_SHIFT)), x)
    if contrast:
        x = torch.where(applied(CONTRAST) & ~first, _convert(x, alpha=column(CONTRAST_ALPHA)), x)
    return x


def opencv_step_bound(row: Sequence[float]) -> int:
    """The largest difference, in uint8 steps, between :func:`photometric_distort` and OpenCV's
    PhotoMetricDistortion (any CPU, any kernel) for one image's draws, a row of
    :data:`PHOTOMETRIC_FIELDS`: 0 for brightness and contrast alone; 1 for a saturation or a hue
    step; a hue step after a saturation step receives its 1-step difference, which can move the
    rounded H by one unit and S by one: 1 + 9 + 1; a contrast step after them scales the
    difference (and truncates)."""
    fields = dict(zip(PHOTOMETRIC_FIELDS, (float(v) for v in row), strict=True))
    steps = HSV_STEP if fields["saturation"] else 0
    if fields["hue"]:
        steps = HSV_STEP + (HUE_UNIT_STEPS + 1 if steps else 0)
    if fields["contrast"] and not fields["contrast_first"]:
        steps = math.ceil(steps * max(fields["contrast_alpha"], 1.0))
    return steps


@functools.cache
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )


def photometric_normalise(
    images: torch.Tensor,
    params: torch.Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` images to the float32 ``[B, C, H, W]`` the model takes, on their device.

    ``params``: float ``[B, 9]`` draws (:data:`PHOTOMETRIC_FIELDS`), or None for no distortion;
    the distortion applies to channels 0..2 (RGB) and needs ``C >= 3``. Keep ``params`` on the
    CPU where it comes from: which steps any image has is read from it (on a GPU that would be
    a synchronisation). ``mean``/``std``: one
    value per channel. ``sizes``: int ``[B, 2]``, each image's valid height and width; outside
    them the output is 0 (the padding), as on the CPU path. None: all valid.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"photometric_normalise takes uint8 [B, C, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
    x = images.to(torch.float32)
    # Which steps any image has, read where the draws are (the CPU, from the DataLoader).
    steps = params[:, list(_STEPS)].gt(0.5).any(0).tolist() if params is not None else [False] * 4
    if any(steps):
        if channels < 3:
            raise ValueError(f"PhotoMetricDistortion needs RGB channels, the images have {channels}")
        rgb = photometric_distort(x[:, :3], params, steps)
        x = rgb if channels == 3 else torch.cat([rgb, x[:, 3:]], dim=1)
    mean_t, std_t = _mean_std(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    out = (x - mean_t) / std_t
    if sizes is not None:
        sizes = sizes.to(out.device)
        rows = torch.arange(out.shape[2], device=out.device) < sizes[:, :1]
        cols = torch.arange(out.shape[3], device=out.device) < sizes[:, 1:]
        valid = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
        out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
