"""Previews of model inputs: normalised ``[C, H, W]`` float images back to viewable ``H x W x 3``
``uint8`` RGB, for ``hooktrain browse`` and the eval hook's sample images.

De-normalisation (``x * std_c + mean_c``) gives the data's own units. A channel count other
than 3 is shown as: 1 (or 2) channels as grey from the first channel, 3 or more as RGB from
the first three (the channels a photometric distortion treats as RGB). 8-bit data (values
within 0..255) is rounded and clipped as it is; wider data (16-bit images) is stretched from
the shown channels' own minimum..maximum to 0..255, so a 12-bit sensor's image is not black.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["denormalise", "preview", "preview_rgb"]

_EIGHT_BIT_MAX = 255.5  # de-normalised 8-bit values stay below this (float32 rounding aside)


def denormalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised float ``[C, H, W]`` image in the data's units, ``H x W x C`` float32."""
    hwc = np.asarray(image, np.float32).transpose(1, 2, 0)
    return hwc * np.asarray(std, np.float32) + np.asarray(mean, np.float32)


def preview_rgb(values: np.ndarray) -> np.ndarray:
    """``H x W x C`` values in the data's units as an ``H x W x 3`` ``uint8`` RGB picture (see the
    module docstring: grey for 1-2 channels, the first three otherwise; 16-bit data stretched)."""
    shown = values[:, :, :3] if values.shape[2] >= 3 else np.repeat(values[:, :, :1], 3, axis=2)
    shown = np.asarray(shown, np.float32)
    if shown.size and shown.max() > _EIGHT_BIT_MAX:
        lo, hi = float(shown.min()), float(shown.max())
        shown = (shown - lo) * (255.0 / (hi - lo))
    return np.ascontiguousarray(np.clip(np.rint(shown), 0, 255).astype(np.uint8))


def preview(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised float ``[C, H, W]`` image as an ``H x W x 3`` ``uint8`` RGB picture."""
    return preview_rgb(denormalise(image, mean, std))
