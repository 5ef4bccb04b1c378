"""Segmentation losses and the OHEM pixel sampler, with MMSegmentation's semantics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.errors import UserError
from hooktrain.models.head_parts import resize
from hooktrain.recipe.model import CrossEntropyLossConfig, DiceLossConfig, OhemConfig

_EPS = torch.finfo(torch.float32).eps


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weight: torch.Tensor | None = None,
    pixel_weight: torch.Tensor | None = None,
    avg_non_ignore: bool = True,
) -> torch.Tensor:
    """mmseg ``CrossEntropyLoss``: per-pixel CE, times class and pixel weights, summed, divided by
    the number of non-ignored pixels (``avg_non_ignore``) or by all pixels.

    Unlike ``F.cross_entropy(weight=...)``, the divisor is a pixel count, not the sum of the class
    weights. A batch whose pixels are all ignored gives 0.

    One channel (binary segmentation) is mmseg's ``CrossEntropyLoss(use_sigmoid=True)``: binary
    cross-entropy of the sigmoid of the logit against the 0/1 mask, ``class_weight`` (one value)
    weighting the foreground pixels (``pos_weight``), the same divisors.
    """
    if logits.shape[1] == 1:
        valid = target != ignore_index
        loss = F.binary_cross_entropy_with_logits(
            logits[:, 0].float(), (target * valid).float(), pos_weight=class_weight, reduction="none"
        )
        loss = loss * valid
    else:
        loss = F.cross_entropy(logits.float(), target, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if pixel_weight is not None:
        loss = loss * pixel_weight
    count = (target != ignore_index).sum() if avg_non_ignore else target.numel()
    return loss.sum() / (count + _EPS)


def dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    class_weight: torch.Tensor | None = None,
    smooth: float = 1.0,
    exponent: int = 2,
) -> torch.Tensor:
    """mmseg ``DiceLoss`` (0.x): softmax probabilities against the one-hot target, per image and
    class ``1 - (2 sum(p t) + smooth) / (sum(p^e + t^e) + smooth)``, averaged over classes and images.

    Only non-ignored pixels count, in both numerator and denominator (mmseg 0.x left ignored
    pixels in its denominator).

    One channel (binary segmentation): the same formula for the foreground alone, on the sigmoid
    probability against the 0/1 mask. (mmseg 1.x's ``DiceLoss`` with one output channel one-hot
    encodes label 0, so its single term scores the *background* against the foreground logit.)
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).flatten(1).unsqueeze(1)  # [B, 1, N]
    if num_classes == 1:
        probs = logits.float().sigmoid().flatten(2)
        one_hot = ((target.flatten(1) == 1).unsqueeze(1) & valid).to(probs.dtype)
    else:
        probs = logits.float().softmax(dim=1).flatten(2)  # [B, C, N]
        one_hot = F.one_hot(target.clamp(0, num_classes - 1).flatten(1), num_classes).transpose(1, 2)
    valid = valid.to(probs.dtype)
    one_hot = one_hot.to(probs.dtype)
    probs, one_hot = probs * valid, one_hot * valid
    numerator = 2 * (probs * one_hot).sum(-1) + smooth
    denominator = (probs.pow(exponent) + one_hot.pow(exponent)).sum(-1) + smooth
    per_class = 1 - numerator / denominator  # [B, C]
    if class_weight is not None:
        per_class = per_class * class_weight
    return per_class.mean()


@torch.no_grad()
def ohem_pixel_weights(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    min_kept: int,
    thresh: float | None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """mmseg ``OHEMPixelSampler``: a 0/1 weight per pixel marking the hard pixels to train on.

    With ``thresh``: pixels whose softmax probability of the true class is below
    ``max(thresh, the (min_kept*B)-th lowest probability)``. Without: the ``min_kept*B`` pixels of
    highest cross-entropy. Either way at least ``min_kept`` per image (or every valid pixel)
    are kept; unlike mmseg, ties at the cut-off cannot drop the count below that.
    """
    valid = target != ignore_index
    safe_target = target.masked_fill(~valid, 0)
    if thresh is not None:
        prob = logits.float().softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        kept, hardness = prob < thresh, -prob
    else:
        hardness = F.cross_entropy(logits.float(), safe_target, reduction="none")
        kept = torch.zeros_like(valid)
    # topk over every pixel, ignored ones last, rather than over the valid pixels: static
    # shapes, so the step compiles as one graph and needs no device-to-host sync.
    batch_kept = min(min_kept * target.shape[0], target.numel())
    hardest = hardness.masked_fill(~valid, -math.inf).flatten().topk(batch_kept).indices
    kept = kept.flatten().index_fill(0, hardest, True).view_as(valid)
    return (kept & valid).float()


class HeadLoss(nn.Module):
    """The configured loss terms of one head: logits are resized to the mask (bilinear, as mmseg)
    and each term is returned as ``{"loss_ce": w * ce, "loss_dice": w * dice}``.

    The OHEM sampler, if any, weights the cross-entropy pixels (mmseg passes its weights as the
    loss's pixel weight; the divisor stays the non-ignored pixel count).
    """

    def __init__(
        self,
        losses: list[CrossEntropyLossConfig | DiceLossConfig],
        sampler: OhemConfig | None,
        *,
        num_classes: int,
        ignore_index: int,
        align_corners: bool,
        where: str,
    ) -> None:
        super().__init__()
        self.losses = list(losses)
        self.sampler = sampler
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        if sampler is not None and num_classes == 1:
            raise UserError(
                f"{where}.sampler: OHEM ranks pixels by their softmax class probability, which one "
                "sigmoid channel (num_classes: 1) does not have; drop the sampler"
            )
        for i, loss in enumerate(self.losses):
            weight = None
            if loss.class_weight is not None:
                if len(loss.class_weight) != num_classes:
                    raise UserError(
                        f"{where}.losses[{i}].class_weight has {len(loss.class_weight)} entries for "
                        f"{num_classes} classes; give one weight per class"
                    )
                weight = torch.tensor(loss.class_weight, dtype=torch.float32)
            # Buffers follow the model across devices; not persistent, so checkpoints stay config-driven.
            self.register_buffer(f"class_weight_{i}", weight, persistent=False)

    @property
    def term_names(self) -> list[str]:
        """The keys :meth:`forward` returns, in its order."""
        return list(dict.fromkeys(_term_name(loss) for loss in self.losses))

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = resize(logits, mask.shape[-2:], self.align_corners)
        pixel_weight = None
        if self.sampler is not None:
            pixel_weight = ohem_pixel_weights(
                logits, mask, min_kept=self.sampler.min_kept, thresh=self.sampler.thresh, ignore_index=self.ignore_index
            )
        terms = {}
        for i, loss in enumerate(self.losses):
            class_weight = getattr(self, f"class_weight_{i}")
            if isinstance(loss, CrossEntropyLossConfig):
                value = cross_entropy(
                    logits,
                    mask,
                    ignore_index=self.ignore_index,
                    class_weight=class_weight,
                    pixel_weight=pixel_weight,
                    avg_non_ignore=loss.avg_non_ignore,
                )
                terms[_term_name(loss)] = loss.weight * value
            else:
                value = dice(
                    logits,
                    mask,
                    ignore_index=self.ignore_index,
                    class_weight=class_weight,
                    smooth=loss.smooth,
                    exponent=loss.exponent,
                )
                terms[_term_name(loss)] = loss.weight * value
        return terms


def _term_name(loss: CrossEntropyLossConfig | DiceLossConfig) -> str:
    return "loss_ce" if isinstance(loss, CrossEntropyLossConfig) else "loss_dice"
