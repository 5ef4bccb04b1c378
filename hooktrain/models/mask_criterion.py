"""Mask2Former's mask-classification criterion: each image's segments are matched one to one
with queries (:mod:`hooktrain.models.matching`), then the matched queries learn their segment's
class and mask, and the other queries the no-object class.

It gives the values and gradients of transformers' ``Mask2FormerLoss`` (with the weights
``Mask2FormerForUniversalSegmentation.get_loss_dict`` applies) when torch's global random
generator is seeded alike: the random points are drawn with the same calls in the same order
(``tests/models/test_mask_criterion.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hooktrain.models.matching import Match, hungarian_match, sample_at_points


def semantic_to_segments(mask: Tensor, ignore_index: int) -> list[tuple[Tensor, Tensor]]:
    """One segment per class present in each image of a semantic map ``mask`` ``[B, H, W]``:
    ``(classes [K] long, ascending, masks [K, H, W] float 0/1)``. Pixels labelled
    ``ignore_index`` belong to no segment (transformers' ``Mask2FormerImageProcessor`` with
    ``ignore_index`` and ``do_reduce_labels=False``)."""
    segments = []
    for image in mask:
        classes = image.unique()
        classes = classes[classes != ignore_index].long()
        segments.append((classes, (image[None] == classes[:, None, None]).float()))
    return segments


def sample_points_by_uncertainty(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """``num_points`` points ``[N, P, 2]`` per mask of ``mask_logits`` ``[N, 1, h, w]``: of
    ``oversample_ratio * num_points`` uniform candidates, the ``importance_sample_ratio`` share
    where the mask is least certain (the smallest ``|logit|``), the rest uniform."""
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(num_masks, num_candidates, 2, device=mask_logits.device)
    uncertainty = -sample_at_points(mask_logits, candidates)[:, 0].abs()
    most_uncertain = uncertainty.topk(num_uncertain, dim=1).indices
    points = candidates.gather(1, most_uncertain[..., None].expand(-1, -1, 2))
    if num_uncertain < num_points:
        uniform = torch.rand(num_masks, num_points - num_uncertain, 2, device=mask_logits.device)
        points = torch.cat([points, uniform], dim=1)
    return points


def sample_matched_targets(targets: list[tuple[Tensor, Tensor]], matches: list[Match], points: Tensor) -> Tensor:
    """The matched target masks' values ``[N, P]`` at their ``points`` ``[N, P, 2]`` (in the order of
    ``matches``), read from each image's masks where they are: gathering the matched masks first
    would copy every one at the input resolution."""
    values, start = [], 0
    for (_, masks), (_, segments) in zip(targets, matches):
        # grid_sample reads mask k at grid k: lay each matched mask's points at its own index.
        grid = points.new_zeros(len(masks), points.shape[1], 2)
        grid[segments] = points[start : start + len(segments)]
        values.append(sample_at_points(masks[:, None], grid)[segments, 0])
        start += len(segments)
    return torch.cat(values)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-mask dice loss ``[N]`` of ``logits`` ``[N, P]`` against 0/1 ``targets`` ``[N, P]``."""
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def average_num_masks(targets: list[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """The number of target segments in the batch, averaged over the processes, at least 1: the
    divisor of the mask losses, the same on every process."""
    num_masks = torch.tensor(float(sum(len(classes) for classes, _ in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_masks)
        num_masks = num_masks / dist.get_world_size()
    return num_masks.clamp(min=1)


class MaskClassificationLoss(nn.Module):
    """Mask2Former's loss on a decoder's predictions, deep supervision included.

    Args:
        num_classes: the classes, without the no-object class (the class logits' last entry).
        class_weight, mask_weight, dice_weight: the weights of the class cross-entropy, the mask
            binary cross-entropy and the mask dice loss, in the matching cost and in the loss.
        no_object_weight: the class cross-entropy's weight of the no-object class.
        num_points: the points masks are compared at, in the matching and in the loss.
        oversample_ratio, importance_sample_ratio: the loss's points are the
            ``importance_sample_ratio`` share of ``oversample_ratio * num_points`` random
            candidates where the prediction is least certain, and uniform random points.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        weights = torch.ones(num_classes + 1)
        weights[-1] = no_object_weight
        self.register_buffer("cross_entropy_weights", weights, persistent=False)

    def forward(
        self, predictions: list[tuple[Tensor, Tensor]], targets: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """The weighted loss terms of ``predictions``, one ``(mask_logits [B, Q, h, w],
        class_logits [B, Q, num_classes + 1])`` per decoder layer, the final layer last, against
        ``targets``, one ``(classes [K], masks [K, H, W])`` per image (:func:`semantic_to_segments`).

        Returns ``loss_cls``, ``loss_mask``, ``loss_dice`` for the final layer and
        ``d{i}.loss_cls``, ... for the earlier layers; their sum is the loss. Computed in float32,
        autocast or not.
        """
        *earlier, final = predictions
        device = final[0].device
        with torch.autocast(device.type, enabled=False):
            targets = [(classes.to(device), masks.to(device, torch.float32)) for classes, masks in targets]
            num_masks = average_num_masks(targets, device)
            # The final layer first: transformers draws its random points first.
            terms = self.layer_terms(*final, targets, num_masks)
            for index, (mask_logits, class_logits) in enumerate(earlier):
                layer = self.layer_terms(mask_logits, class_logits, targets, num_masks)
                terms.update({f"d{index}.{name}": value for name, value in layer.items()})
        return terms

    def layer_terms(
        self, mask_logits: Tensor, class_logits: Tensor, targets: list[tuple[Tensor, Tensor]], num_masks: Tensor
    ) -> dict[str, Tensor]:
        """One decoder layer's weighted ``loss_cls``, ``loss_mask`` and ``loss_dice``."""
        mask_logits, class_logits = mask_logits.float(), class_logits.float()
        matches = hungarian_match(
            mask_logits, class_logits, targets, num_points=self.num_points,
            class_weight=self.class_weight, mask_weight=self.mask_weight, dice_weight=self.dice_weight,
        )  # fmt: skip
        mask_bce, mask_dice = self.mask_losses(mask_logits, targets, matches)
        return {
            "loss_cls": self.class_weight * self.class_loss(class_logits, targets, matches),
            "loss_mask": self.mask_weight * mask_bce / num_masks,
            "loss_dice": self.dice_weight * mask_dice / num_masks,
        }

    def class_loss(self, class_logits: Tensor, targets: list[tuple[Tensor, Tensor]], matches: list[Match]) -> Tensor:
        """Weighted cross-entropy over all queries; unmatched queries are the no-object class."""
        target_classes = torch.full(class_logits.shape[:2], self.num_classes, device=class_logits.device)
        for image, ((queries, segments), (classes, _)) in enumerate(zip(matches, targets)):
            target_classes[image, queries] = classes[segments]
        weights = self.cross_entropy_weights.to(class_logits.device)
        return F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight=weights)

    def mask_losses(
        self, mask_logits: Tensor, targets: list[tuple[Tensor, Tensor]], matches: list[Match]
    ) -> tuple[Tensor, Tensor]:
        """The matched masks' binary cross-entropy (mean over the points) and dice loss, each
        summed over the masks, at points sampled by uncertainty."""
        images = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(matches)])
        queries = torch.cat([queries for queries, _ in matches])
        matched_logits = mask_logits[images, queries][:, None]
        if len(matched_logits) == 0:  # no segment in the batch; keeps the graph (and DDP) connected
            zero = matched_logits.sum()
            return zero, zero
        with torch.no_grad():
            points = sample_points_by_uncertainty(
                matched_logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_targets = sample_matched_targets(targets, matches, points)
        point_logits = sample_at_points(matched_logits, points)[:, 0]
        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1)
        return bce.sum(), dice_loss(point_logits, point_targets).sum()
