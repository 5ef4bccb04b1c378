"""The model's input stage (MMSegmentation's ``SegDataPreProcessor``): a train batch as the
model takes it, on the model's device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hooktrain.data.device_augment import photometric_normalise


class InputStage:
    """Turns a train batch into ``(image, mask)`` on ``device``: float32 normalised images and
    int64 masks.

    A ``gpu_augment`` batch (one with ``"photometric"``) arrives as uint8 and is distorted and
    normalised on the device with ``mean`` / ``std`` (the recipe's ``data.mean`` /
    ``data.std``; :mod:`hooktrain.data.device_augment`). Any other batch was normalised by the
    DataLoader workers and only moves. Every ``Segmentor`` has one (``input_stage``); a model
    of one's own without it gets ``InputStage()``, which only moves batches.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.mean = None if mean is None else list(mean)
        self.std = None if std is None else list(std)

    def __call__(self, batch: dict[str, Any], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True).long()
        if "photometric" in batch:
            if self.mean is None or self.std is None:
                raise ValueError("a gpu_augment batch needs the input stage's mean and std (InputStage(mean, std))")
            sizes = batch["image_sizes"].to(device, non_blocking=True)
            image = photometric_normalise(image, batch["photometric"], self.mean, self.std, sizes)
        return image, mask

    def __repr__(self) -> str:
        return f"InputStage(mean={self.mean}, std={self.std})"
