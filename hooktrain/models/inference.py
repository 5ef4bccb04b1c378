"""Whole-image and sliding-window inference, and test-time augmentation (mmseg 1.x semantics).

Without ``scales`` or ``flip`` a prediction is the logits of the val pipeline's image, resized
to the original size. With them it is MMSegmentation 1.x's ``SegTTAModel``: every variant (each
scale, each without and with a horizontal flip) runs the usual whole/slide inference, its
logits are flipped back, resized (bilinear) to the original size and turned into probabilities
(softmax; sigmoid for one output channel), and the prediction is the mean of those
probabilities. Variants run one after another into one running sum at the original size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from hooktrain.models.blending import WindowWeights
from hooktrain.models.head_parts import resize
from hooktrain.recipe.model import InferenceConfig

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


def slide_logits(
    logits_fn: LogitsFn, image: torch.Tensor, crop: Sequence[int], stride: Sequence[int], blend: str = "mean"
) -> torch.Tensor:
    """Sliding-window logits of one image [1,3,H,W]: window logits summed into place and divided
    by how many windows cover each pixel (``blend="mean"``, mmseg), or weighted by ``blend``'s
    window (:mod:`hooktrain.models.blending`). All windows share a size, so they run as one batch."""
    height, width = image.shape[-2:]
    windows = slide_windows(height, width, crop, stride)
    crops = torch.cat([image[..., y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    window_logits = logits_fn(crops).float()
    total = window_logits.new_zeros((1, window_logits.shape[1], height, width))
    count = window_logits.new_zeros((1, 1, height, width))
    if blend == "mean":
        for (y1, y2, x1, x2), logits in zip(windows, window_logits):
            total[0, :, y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
        return total / count
    weights = WindowWeights(windows, height, width, blend)
    for window, logits in zip(windows, window_logits):
        y1, y2, x1, x2 = window
        weight = weights(window).to(logits.device)
        total[0, :, y1:y2, x1:x2] += logits * weight
        count[0, 0, y1:y2, x1:x2] += weight
    return total / count


def image_logits(
    logits_fn: LogitsFn,
    image: torch.Tensor,
    cfg: InferenceConfig,
    *,
    flip: bool = False,
) -> torch.Tensor:
    """Float32 logits [1,C,h,w] of one image [1,3,h,w] by ``cfg.mode``; with ``flip`` the
    image is flipped horizontally first and its logits flipped back. With ``cfg.size_divisor``
    the (flipped) image is padded bottom/right with 0 to a multiple of it and the logits are
    cropped back before the flip, as MMSegmentation's test-time ``stack_batch`` padding and its
    ``postprocess_result`` do."""
    image = image.flip(-1) if flip else image
    height, width = image.shape[-2:]
    image = pad_to_multiple(image, cfg.size_divisor)
    if cfg.mode == "whole":
        logits = logits_fn(image).float()
    else:
        logits = slide_logits(logits_fn, image, cfg.crop_size, cfg.stride, cfg.blend)
    logits = logits[..., :height, :width]
    return logits.flip(-1) if flip else logits


def pad_to_multiple(image: torch.Tensor, divisor: int | None) -> torch.Tensor:
    """``image [..., h, w]`` padded at the bottom and right with 0 to multiples of ``divisor``
    (mmseg ``stack_batch(size_divisor=...)``); unchanged for None, 1 or sides already multiples."""
    if not divisor or divisor == 1:
        return image
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % divisor, -width % divisor
    if not pad_h and not pad_w:
        return image
    return torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class dimension (dim 0 of [C,H,W]); sigmoid for one channel (mmseg)."""
    return logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(dim=0)


def averages_probabilities(cfg: InferenceConfig) -> bool:
    """Whether :func:`predict_logits` / :func:`predict_scales` return mean probabilities for
    ``cfg`` (``flip`` or ``scales``) rather than logits."""
    return cfg.flip or cfg.scales is not None


def predicted_labels(scores: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """The label map ``[H, W]`` (int64) of one image's scores ``[C, H, W]`` as predicted for
    ``cfg``: the argmax over classes; for one sigmoid channel (binary segmentation), 1 where the
    foreground probability exceeds ``cfg.threshold``, else 0 (mmseg: ``sigmoid(logits) >
    threshold``; with TTA, the mean probability against the threshold)."""
    if scores.shape[0] != 1:
        return scores.argmax(0)
    probs = scores[0].float() if averages_probabilities(cfg) else scores[0].float().sigmoid()
    return (probs > cfg.threshold).long()


def as_logits(scores: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Logits equivalent to what :func:`predict_logits` / :func:`predict_scales` returned for
    ``cfg``: the scores themselves, or for averaged probabilities (``flip`` or ``scales``) their
    log (softmax of it gives them back) or, for one sigmoid channel, their log-odds. Lets a
    loss be computed on exactly the prediction that is scored."""
    scores = scores.float()
    if not averages_probabilities(cfg):
        return scores
    if scores.shape[0] == 1:  # one sigmoid channel
        p = scores.clamp(1e-7, 1 - 1e-7)
        return p.log() - (-p).log1p()
    return scores.clamp_min(1e-12).log()


class ProbabilityMean:
    """Running mean of the variants' probabilities of one image at its original size."""

    def __init__(self, ori_shape: Sequence[int], align_corners: bool) -> None:
        self.ori_shape = (int(ori_shape[0]), int(ori_shape[1]))
        self.align_corners = align_corners
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, logits: torch.Tensor) -> None:
        """Add one variant's logits [1,C,h,w] (already flipped back): resized, then softmax."""
        probs = probabilities(
            resize(logits.float(), self.ori_shape, self.align_corners)[0].float()
        )
        self.total = probs if self.total is None else self.total.add_(probs)
        self.count += 1

    def mean(self) -> torch.Tensor:
        """The mean probabilities [C,H,W] (float32)."""
        if self.total is None:
            raise ValueError("no variant was added")
        return self.total / self.count


def flips(cfg: InferenceConfig) -> tuple[bool, ...]:
    """The flip variants of each scale: without, then (with ``cfg.flip``) with (mmseg's order)."""
    return (False, True) if cfg.flip else (False,)


def predict_logits(
    logits_fn: LogitsFn,
    image: torch.Tensor,
    img_shapes: Sequence[Sequence[int]],
    ori_shapes: Sequence[Sequence[int]],
    cfg: InferenceConfig,
    align_corners: bool,
) -> list[torch.Tensor]:
    """Per-image float32 scores ``[C, H_i, W_i]`` at each original size: logits, or with
    ``cfg.flip`` the mean probabilities of the image and its flip (argmax is the prediction
    either way).

    ``image`` is a padded batch whose i-th image fills the top-left ``img_shapes[i]``. ``whole``
    runs the images of each size together, cropped out of the padding (unlike mmseg 1.x, which
    runs the padded batch, so its predictions depend on the batch); ``slide`` runs each image's
    own region. With ``flip``, the logits of the horizontally flipped input are flipped back;
    each variant's logits are resized to ``ori_shapes[i]``, turned into probabilities and
    averaged, as MMSegmentation 1.x's TTA (flip exists only there) does. ``cfg.scales`` needs
    the original images: use :func:`predict_scales`.
    """
    if len(img_shapes) != image.shape[0] or len(ori_shapes) != image.shape[0]:
        raise ValueError(
            f"batch of {image.shape[0]} images with {len(img_shapes)} img_shapes and {len(ori_shapes)} ori_shapes"
        )
    if cfg.scales is not None:
        raise ValueError(
            "inference.scales rescales the original images: predict with predict_scales"
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
            logits = image_logits(logits_fn, image[members, :, :h, :w], cfg, flip=flip)
            for k, i in enumerate(members):
                outputs[i] = logits[k : k + 1]
        return outputs

    def slide(flip: bool) -> list[torch.Tensor]:
        return [
            image_logits(logits_fn, image[i : i + 1, :, :h, :w], cfg, flip=flip)
            for i, (h, w) in enumerate(img_shapes)
        ]

    infer = whole if cfg.mode == "whole" else slide
    if not cfg.flip:
        return [
            resize(out, tuple(ori), align_corners)[0]
            for out, ori in zip(infer(False), ori_shapes)
        ]
    means = [ProbabilityMean(ori, align_corners) for ori in ori_shapes]
    for flip in flips(cfg):
        for mean, logits in zip(means, infer(flip)):
            mean.add(logits)
    return [mean.mean() for mean in means]


@torch.no_grad()
def predict_scales(
    logits_fn: LogitsFn,
    views: Iterable[torch.Tensor],
    ori_shape: Sequence[int],
    cfg: InferenceConfig,
    align_corners: bool,
) -> torch.Tensor:
    """Mean probabilities ``[C, H, W]`` (float32) of one image over its scaled ``views``.

    ``views`` yields the image at each of ``cfg.scales``, normalised, ``[1,3,h,w]`` on the
    model's device (see ``ValTransform.rescaled``); it may be a generator, so only one view is
    made and held at a time. Each view runs ``cfg.mode`` inference, also flipped with
    ``cfg.flip``; every variant's logits are flipped back, resized to ``ori_shape`` and
    softmaxed into one running sum (mmseg ``SegTTAModel.merge_preds``).
    """
    mean = ProbabilityMean(ori_shape, align_corners)
    for view in views:
        for flip in flips(cfg):
            mean.add(image_logits(logits_fn, view, cfg, flip=flip))
    return mean.mean()
