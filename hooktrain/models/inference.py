"""Whole-image and sliding-window inference with optional flip averaging (mmseg semantics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hooktrain.models.config import InferenceConfig
from hooktrain.models.heads import resize

# Maps an image batch [B,3,h,w] to logits [B,C,h,w] at the same size.
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def slide_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's window grid: ``ceil((H - crop) / stride) + 1`` windows per axis, each shifted back
    inside the image at the far edge. Returns ``(y1, y2, x1, x2)``; windows are ``min(crop, H)``
    by ``min(crop, W)``."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def slide_logits(logits_fn: LogitsFn, image: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Sliding-window logits of one image [1,3,H,W]: window logits summed into place and divided
    by how many windows cover each pixel. All windows share a size, so they run as one batch."""
    height, width = image.shape[-2:]
    windows = slide_windows(height, width, crop, stride)
    crops = torch.cat([image[..., y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    window_logits = logits_fn(crops).float()
    total = window_logits.new_zeros((1, window_logits.shape[1], height, width))
    count = window_logits.new_zeros((1, 1, height, width))
    for (y1, y2, x1, x2), logits in zip(windows, window_logits):
        total[0, :, y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return total / count


def predict_logits(
    logits_fn: LogitsFn,
    image: torch.Tensor,
    img_shapes: Sequence[Sequence[int]],
    ori_shapes: Sequence[Sequence[int]],
    cfg: InferenceConfig,
    align_corners: bool,
) -> list[torch.Tensor]:
    """Per-image float32 logits ``[C, H_i, W_i]`` at each original size.

    ``image`` is a padded batch whose i-th image fills the top-left ``img_shapes[i]``. ``whole``
    runs the images of each size together, cropped out of the padding (unlike mmseg 1.x, which
    runs the padded batch, so its predictions depend on the batch); ``slide`` runs each image's
    own region. With
    ``flip``, the logits of the horizontally flipped input are flipped back and averaged with the
    plain ones (mmseg 1.x's TTA also averages logits). The padding is then cropped away and the
    logits are resized to ``ori_shapes[i]``.
    """
    if len(img_shapes) != image.shape[0] or len(ori_shapes) != image.shape[0]:
        raise ValueError(
            f"batch of {image.shape[0]} images with {len(img_shapes)} img_shapes and {len(ori_shapes)} ori_shapes"
        )

    def whole(flip: bool) -> list[torch.Tensor]:
        # Images of one size run together, each cropped out of the padding first, so a
        # prediction never depends on which other images share its batch (metrics are then
        # the same for any batch size and number of processes).
        outputs: list[torch.Tensor | None] = [None] * len(img_shapes)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(img_shapes):
            groups.setdefault((int(shape[0]), int(shape[1])), []).append(i)
        for (h, w), members in groups.items():
            crops = image[members, :, :h, :w]
            logits = logits_fn(crops.flip(-1) if flip else crops).float()
            logits = logits.flip(-1) if flip else logits
            for k, i in enumerate(members):
                outputs[i] = logits[k : k + 1]
        return outputs

    def slide(flip: bool) -> list[torch.Tensor]:
        outputs = []
        for i, (h, w) in enumerate(img_shapes):
            crop = image[i : i + 1, :, :h, :w]
            logits = slide_logits(logits_fn, crop.flip(-1) if flip else crop, cfg.crop_size, cfg.stride)
            outputs.append(logits.flip(-1) if flip else logits)
        return outputs

    infer = whole if cfg.mode == "whole" else slide
    outputs = infer(False)
    if cfg.flip:
        outputs = [(a + b) / 2 for a, b in zip(outputs, infer(True))]
    return [resize(out, tuple(ori), align_corners)[0] for out, ori in zip(outputs, ori_shapes)]
