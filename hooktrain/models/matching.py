"""Mask2Former's Hungarian matching of predicted masks to target segments, and the point sampling
both the matching and the mask losses compare masks with.

Masks are never compared pixel by pixel: predictions (at a quarter of the input resolution, say)
and targets (at the input resolution) are both read at the same points in ``[0, 1]^2`` by bilinear
interpolation, so their resolutions need not agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Match = tuple[Tensor, Tensor]  # (query indices, target segment indices), one pair per matched segment


def sample_at_points(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps`` ``[N, C, H, W]`` at ``points`` ``[N, P, 2]`` (``x, y`` in
    ``[0, 1]``; ``grid_sample`` with ``align_corners=False``, zeros outside): ``[N, C, P]``."""
    grid = 2.0 * points.unsqueeze(2) - 1.0
    return F.grid_sample(maps, grid, align_corners=False).squeeze(3)


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every predicted mask ``[Q, P]`` (logits) against every target
    mask ``[K, P]`` (0/1) over the ``P`` points: ``[Q, K]``."""
    # -log(1 - sigmoid(x)) = softplus(x) where the target is 0, and -log(sigmoid(x)) = softplus(x) - x
    # where it is 1: one softplus and one product instead of two of each.
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss (``1 - (2|p t| + 1) / (|p| + |t| + 1)``, ``p`` the sigmoid) of every predicted mask
    ``[Q, P]`` against every target mask ``[K, P]``: ``[Q, K]``."""
    probs = logits.sigmoid()
    overlap = probs @ targets.T
    sizes = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (2 * overlap + 1) / (sizes + 1)


def matching_cost(
    mask_logits: Tensor,
    class_logits: Tensor,
    classes: Tensor,
    masks: Tensor,
    points: Tensor,
    *,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
) -> Tensor:
    """The cost ``[Q, K]`` of giving each of one image's ``Q`` queries (``mask_logits`` ``[Q, h, w]``,
    ``class_logits`` ``[Q, C + 1]``) each of its ``K`` segments (``classes`` ``[K]``, ``masks``
    ``[K, H, W]``), masks compared at ``points`` ``[1, P, 2]``. Non-finite costs become the largest
    float, so such a pair is only matched when nothing else can be."""
    class_cost = -class_logits.softmax(-1)[:, classes]
    point_logits = sample_at_points(mask_logits[None], points)[0]
    point_targets = sample_at_points(masks[None].to(point_logits), points)[0]
    cost = (
        class_weight * class_cost
        + mask_weight * pairwise_sigmoid_bce(point_logits, point_targets)
        + dice_weight * pairwise_dice(point_logits, point_targets)
    )
    largest = torch.finfo(cost.dtype).max
    return torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)


@torch.no_grad()
def hungarian_match(
    mask_logits: Tensor,
    class_logits: Tensor,
    targets: list[tuple[Tensor, Tensor]],
    *,
    num_points: int,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
) -> list[Match]:
    """The assignment of minimal total :func:`matching_cost` per image (``linear_sum_assignment``),
    masks compared at ``num_points`` points drawn uniformly per image from torch's global random
    generator: for each image, the matched query indices (ascending) and their segments' indices.

    ``mask_logits`` ``[B, Q, h, w]``, ``class_logits`` ``[B, Q, C + 1]``, ``targets`` one
    ``(classes [K], masks [K, H, W])`` per image. Costs are computed in float32.
    """
    # Imported here, not with the module: every segmentor build imports this module (segmentor.py
    # imports the EoMT and Mask2Former builders), and scipy.optimize adds ~0.5 s to each process.
    from scipy.optimize import linear_sum_assignment

    matches = []
    for image_mask_logits, image_class_logits, (classes, masks) in zip(mask_logits, class_logits, targets):
        # Drawn even for an image without segments: the same draws as transformers', in the same order.
        points = torch.rand(1, num_points, 2, device=mask_logits.device)
        if len(classes) == 0:
            none = torch.empty(0, dtype=torch.long, device=mask_logits.device)
            matches.append((none, none))
            continue
        cost = matching_cost(
            image_mask_logits.float(), image_class_logits.float(), classes, masks, points,
            class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
        )  # fmt: skip
        queries, segments = linear_sum_assignment(cost.cpu().numpy())
        matches.append(
            (torch.as_tensor(queries, device=mask_logits.device), torch.as_tensor(segments, device=mask_logits.device))
        )
    return matches
