"""hooktrain.models.mask_criterion against transformers' Mask2Former loss: the same segments from a
semantic map, the same weighted loss terms and the same gradients when torch's global random
generator is seeded alike (both draw their points from it with the same calls in the same order),
and the matching's own properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hooktrain.models import mask_criterion
from hooktrain.models.mask_criterion import MaskClassificationLoss, average_num_masks, semantic_to_segments
from hooktrain.models.matching import hungarian_match, matching_cost

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss  # noqa: E402

NUM_CLASSES = 5
IGNORE = 255
WEIGHTS = {"class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0}  # transformers' and Mask2Former's
OUR_NAMES = {"loss_cross_entropy": "loss_cls", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}


def semantic_maps(case: str) -> torch.Tensor:
    """Two 64x64 maps of 5 classes, a band of ignored pixels; ``one_empty``: the second image all
    ignored; ``all_empty``: both; any other case: both images with segments."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=generator)
    maps = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blobs, not salt and pepper
    maps[:, :6] = IGNORE
    if case in ("one_empty", "all_empty"):
        maps[1] = IGNORE
    if case == "all_empty":
        maps[0] = IGNORE
    return maps


def random_predictions(seed: int = 1, layers: int = 3, queries: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            (2 * torch.randn(2, queries, 16, 16, generator=generator)).requires_grad_(),
            torch.randn(2, queries, NUM_CLASSES + 1, generator=generator).requires_grad_(),
        )
        for _ in range(layers)
    ]


def transformers_terms(predictions, targets, num_points: int = 12544) -> dict[str, torch.Tensor]:
    """transformers' loss terms under our names, weighted as ``Mask2FormerForUniversalSegmentation
    .get_loss_dict`` weights them (its auxiliary ``_i`` suffix becomes our ``d{i}.`` prefix)."""
    config = transformers.Mask2FormerConfig(
        num_labels=NUM_CLASSES, no_object_weight=0.1, train_num_points=num_points, oversample_ratio=3.0,
        importance_sample_ratio=0.75, **WEIGHTS,
    )  # fmt: skip
    weight_dict = {"loss_cross_entropy": WEIGHTS["class_weight"], "loss_mask": WEIGHTS["mask_weight"],
                   "loss_dice": WEIGHTS["dice_weight"]}  # fmt: skip
    (mask_logits, class_logits), earlier = predictions[-1], predictions[:-1]
    auxiliary = [{"masks_queries_logits": masks, "class_queries_logits": classes} for masks, classes in earlier]
    raw = Mask2FormerLoss(config, weight_dict)(
        mask_logits, class_logits, [masks for _, masks in targets], [classes for classes, _ in targets], auxiliary
    )
    terms = {}
    for name, value in raw.items():
        base, _, layer = name.rpartition("_") if name[-1].isdigit() else (name, "", "")
        weight = next(w for key, w in weight_dict.items() if key in base)
        terms[f"d{layer}.{OUR_NAMES[base]}" if layer else OUR_NAMES[base]] = value * weight
    return terms


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12))


def run_both(case: str, seed: int = 7):
    targets = semantic_to_segments(semantic_maps(case), IGNORE)
    queries = 3 if case == "fewer_queries_than_segments" else 10
    ours_in, theirs_in = random_predictions(queries=queries), random_predictions(queries=queries)
    torch.manual_seed(seed)
    ours = MaskClassificationLoss(NUM_CLASSES, no_object_weight=0.1, **WEIGHTS)(ours_in, targets)
    torch.manual_seed(seed)
    theirs = transformers_terms(theirs_in, targets)
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    return ours, theirs, ours_in, theirs_in


@pytest.mark.parametrize("case", ["full", "one_empty", "all_empty", "fewer_queries_than_segments"])
def test_terms_and_gradients_equal_transformers_mask2former_loss(case):
    ours, theirs, ours_in, theirs_in = run_both(case)
    names = {"loss_cls", "loss_mask", "loss_dice"}
    assert set(ours) == names | {f"d{i}.{name}" for i in (0, 1) for name in names} == set(theirs)
    for name in ours:
        assert relative_error(ours[name].detach(), theirs[name].detach()) < 1e-5, name
    assert relative_error(sum(ours.values()).detach(), sum(theirs.values()).detach()) < 1e-5
    for (our_masks, our_classes), (their_masks, their_classes) in zip(ours_in, theirs_in):
        assert our_classes.grad.abs().max() > 0 and relative_error(our_classes.grad, their_classes.grad) < 1e-5
        assert relative_error(our_masks.grad, their_masks.grad) < 1e-5
        if case == "all_empty":
            assert our_masks.grad.abs().max() == 0 and ours["loss_mask"] == ours["loss_dice"] == 0
        else:
            assert our_masks.grad.abs().max() > 0 and ours["loss_mask"] > 0 and ours["loss_dice"] > 0


def test_the_parity_depends_on_the_points():
    """Differently seeded, the points differ and so do the mask terms: the parity above is not vacuous."""
    targets = semantic_to_segments(semantic_maps("full"), IGNORE)
    criterion = MaskClassificationLoss(NUM_CLASSES, num_points=64)
    torch.manual_seed(1)
    first = criterion(random_predictions(), targets)
    torch.manual_seed(2)
    second = criterion(random_predictions(), targets)
    assert relative_error(first["loss_mask"].detach(), second["loss_mask"].detach()) > 1e-3


def test_segments_equal_the_mask2former_image_processors():
    maps = semantic_maps("one_empty")
    maps[0, 20:30, 20:30] = 7  # a class id beyond those of the rest, still a segment
    processor = transformers.Mask2FormerImageProcessor(
        do_resize=False, do_rescale=False, do_normalize=False, ignore_index=IGNORE, do_reduce_labels=False
    )
    images = [np.zeros((64, 64, 3), dtype=np.uint8)] * 2
    encoded = processor(images, segmentation_maps=[m.numpy().astype(np.uint8) for m in maps], return_tensors="pt")
    segments = semantic_to_segments(maps, IGNORE)
    assert [classes.tolist() for classes, _ in segments][0] == sorted(set(maps[0].unique().tolist()) - {IGNORE})
    assert len(segments[1][0]) == 0 and segments[1][1].shape == (0, 64, 64)
    for (classes, masks), their_classes, their_masks in zip(segments, encoded["class_labels"], encoded["mask_labels"]):
        assert classes.dtype == their_classes.dtype == torch.long and torch.equal(classes, their_classes)
        assert masks.dtype == their_masks.dtype == torch.float32 and torch.equal(masks, their_masks)


def test_matching_pairs_each_segment_with_the_query_that_predicts_it():
    masks = torch.zeros(2, 32, 32)
    masks[0, :, :16], masks[1, :, 16:] = 1, 1
    targets = [(torch.tensor([1, 3]), masks)]
    right_half, left_half = 10 * (2 * masks[1] - 1), 10 * (2 * masks[0] - 1)
    mask_logits = torch.stack([right_half, -10 * torch.ones(32, 32), left_half])[None]  # queries 2, 0 hit
    class_logits = torch.full((1, 3, NUM_CLASSES + 1), -5.0)
    class_logits[0, 0, 3] = class_logits[0, 2, 1] = class_logits[0, 1, NUM_CLASSES] = 5.0
    torch.manual_seed(0)
    [(queries, segments)] = hungarian_match(mask_logits, class_logits, targets, num_points=256, **WEIGHTS)
    assert queries.tolist() == [0, 2] and segments.tolist() == [1, 0]


def test_matching_minimises_the_total_cost():
    torch.manual_seed(0)
    targets = semantic_to_segments(semantic_maps("full")[:1], IGNORE)
    (mask_logits, class_logits), *_ = random_predictions(seed=3, layers=1, queries=6)
    mask_logits, class_logits = mask_logits[:1].detach(), class_logits[:1].detach()
    classes, masks = targets[0]
    torch.manual_seed(4)
    [(queries, segments)] = hungarian_match(mask_logits, class_logits, targets, num_points=500, **WEIGHTS)
    torch.manual_seed(4)  # the same points
    cost = matching_cost(mask_logits[0], class_logits[0], classes, masks, torch.rand(1, 500, 2), **WEIGHTS)
    best = min(
        sum(cost[query, segment] for segment, query in enumerate(chosen))
        for chosen in itertools.permutations(range(6), len(classes))
    )
    assert len(queries) == len(classes) == 5 and sorted(segments.tolist()) == list(range(5))
    assert float(cost[queries, segments].sum()) == pytest.approx(float(best), rel=1e-6)


def test_a_right_prediction_scores_lower_than_a_wrong_one():
    targets = semantic_to_segments(semantic_maps("full"), IGNORE)
    right_masks = torch.zeros(2, 10, 16, 16)
    right_classes = torch.full((2, 10, NUM_CLASSES + 1), -4.0)
    right_classes[..., NUM_CLASSES] = 4.0
    for image, (classes, masks) in enumerate(targets):
        right_masks[image, : len(classes)] = F.adaptive_avg_pool2d(masks, 16)
        right_classes[image, torch.arange(len(classes)), classes] = 4.0
        right_classes[image, torch.arange(len(classes)), NUM_CLASSES] = -4.0
    right_masks = 12 * (2 * right_masks - 1)
    shifted_masks = right_masks.roll(4, dims=3)  # every mask a quarter of the image off
    permuted_masks = right_masks.roll(1, dims=1)  # every segment's class, the next segment's mask
    criterion = MaskClassificationLoss(NUM_CLASSES, num_points=1024)
    terms = {}
    for name, masks in [("right", right_masks), ("shifted", shifted_masks), ("permuted", permuted_masks)]:
        torch.manual_seed(0)
        terms[name] = criterion([(masks, right_classes)], targets)
    right, shifted, permuted = terms["right"], terms["shifted"], terms["permuted"]
    assert right["loss_mask"] < 0.5 * shifted["loss_mask"] and right["loss_dice"] < 0.5 * shifted["loss_dice"]
    assert sum(right.values()) < sum(shifted.values())
    # The matching finds each mask's new query, whose class is now wrong: only the class term rises.
    assert permuted["loss_mask"] == right["loss_mask"] and permuted["loss_dice"] == right["loss_dice"]
    assert permuted["loss_cls"] > 2 * right["loss_cls"]


def test_under_bf16_autocast_it_computes_in_float32():
    targets = semantic_to_segments(semantic_maps("full"), IGNORE)
    predictions = [(masks.detach().bfloat16(), classes.detach().bfloat16()) for masks, classes in random_predictions()]
    criterion = MaskClassificationLoss(NUM_CLASSES, num_points=256)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(predictions, targets)
    torch.manual_seed(0)
    exact = criterion([(masks.float(), classes.float()) for masks, classes in predictions], targets)
    assert all(value.dtype == torch.float32 for value in mixed.values())
    assert all(torch.equal(mixed[name], exact[name]) for name in exact)


def test_num_masks_is_averaged_over_the_processes(monkeypatch):
    """Two processes with 5 and 3 segments: each divides by 4 (``all_reduce`` simulated)."""
    targets = semantic_to_segments(semantic_maps("one_empty"), IGNORE)
    assert float(average_num_masks(targets, torch.device("cpu"))) == 5
    monkeypatch.setattr(mask_criterion.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mask_criterion.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(mask_criterion.dist, "all_reduce", lambda tensor: tensor.add_(3))
    assert float(average_num_masks(targets, torch.device("cpu"))) == 4
    monkeypatch.setattr(mask_criterion.dist, "all_reduce", lambda tensor: tensor.zero_())
    assert float(average_num_masks(targets, torch.device("cpu"))) == 1  # clamped
