"""hooktrain.evaluation.metrics against independent references: a per-class numpy loop for the areas,
mmseg 0.x's torch.histc areas, and the metric formulas written out class by class."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch

from hooktrain.evaluation.metrics import (
    METRICS,
    Areas,
    areas_from_confusion,
    confusion_counts,
    format_table,
    intersect_and_union,
    summarize,
    top_confusions,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- references


def reference_areas(pred, label, num_classes, ignore_index=255):
    """Areas with boolean masks, one class at a time; also the out-of-range label count."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    not_ignored = label != ignore_index
    in_range = (label >= 0) & (label < num_classes)
    valid = not_ignored & in_range
    out = np.zeros((4, num_classes), dtype=np.int64)
    for c in range(num_classes):
        is_pred, is_label = valid & (pred == c), valid & (label == c)
        i, p, lab = (is_pred & is_label).sum(), is_pred.sum(), is_label.sum()
        out[:, c] = [i, p + lab - i, p, lab]
    return out, int((not_ignored & ~in_range).sum())


def histc_areas(pred, label, num_classes, ignore_index=255):
    """mmseg 0.x `intersect_and_union` (torch branch), stacked as [4, C]."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    intersect = pred[pred == label]

    def hist(x):
        return torch.histc(x.float(), bins=num_classes, min=0, max=num_classes - 1)

    area_intersect, area_pred, area_label = hist(intersect), hist(pred), hist(label)
    area_union = area_pred + area_label - area_intersect
    return torch.stack([area_intersect, area_union, area_pred, area_label]).long()


def _div(a, b):
    return a / b if b else math.nan


def reference_summary(counts, beta=1.0, nan_to_num=None):
    """mmseg's total_area_to_metrics for all three metrics, one Python float at a time."""
    intersect, union, pred, label = (list(map(int, row)) for row in counts)
    per_class = {k: [] for k in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")}
    for i, u, p, lab in zip(intersect, union, pred, label):
        precision, recall = _div(i, p), _div(i, lab)
        if math.isnan(precision) or math.isnan(recall):
            fscore = math.nan
        else:
            fscore = _div((1 + beta**2) * precision * recall, beta**2 * precision + recall)
        for key, value in zip(
            per_class,
            [_div(i, u), _div(i, lab), _div(2 * i, p + lab), fscore, precision, recall],
        ):
            per_class[key].append(value)
    a_acc = _div(sum(intersect), sum(label))
    if nan_to_num is not None:
        a_acc = nan_to_num if math.isnan(a_acc) else a_acc
        per_class = {k: [nan_to_num if math.isnan(x) else x for x in v] for k, v in per_class.items()}
    scalars = {"aAcc": a_acc}
    for key, values in per_class.items():
        kept = [x for x in values if not math.isnan(x)]
        scalars["m" + key] = sum(kept) / len(kept) if kept else math.nan
    return scalars, per_class


def assert_areas_equal(areas, expected, num_out_of_range=0):
    assert areas.as_tensor().dtype == torch.int64
    np.testing.assert_array_equal(areas.as_tensor().cpu().numpy(), expected)
    assert int(areas.num_out_of_range) == num_out_of_range


def blobby(generator, shape, num_classes):
    """Label maps made of rectangles, predictions = labels with 20 % noise, 255 regions."""
    h, w = shape
    label = torch.randint(0, num_classes, (1,), generator=generator).expand(h, w).clone()
    for _ in range(6):
        y = torch.randint(0, h, (2,), generator=generator).tolist()
        x = torch.randint(0, w, (2,), generator=generator).tolist()
        cls = int(torch.randint(0, num_classes, (1,), generator=generator))
        label[min(y) : max(y) + 1, min(x) : max(x) + 1] = cls
    label[: h // 8] = 255
    pred = label.clone().clamp_(max=num_classes - 1)
    noise = torch.rand(shape, generator=generator) < 0.2
    pred[noise] = torch.randint(0, num_classes, (int(noise.sum()),), generator=generator)
    return pred, label


# ---------------------------------------------------------------- areas


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(5))
def test_areas_match_reference_on_random_inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = [2, 7, 19, 150, 1][seed]
    label = torch.randint(0, num_classes, (37, 53), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.1] = 255
    label[torch.rand(label.shape, generator=g) < 0.05] = num_classes + 3  # out of range
    label[torch.rand(label.shape, generator=g) < 0.05] = -2
    pred = torch.randint(-1, num_classes + 2, label.shape, generator=g)  # some out of range
    expected, bad = reference_areas(pred.numpy(), label.numpy(), num_classes)
    areas = intersect_and_union(pred.to(device), label.to(device), num_classes)
    assert areas.intersect.device.type == device
    assert bad > 0
    assert_areas_equal(areas, expected, bad)


def test_realistic_inputs_match_mmseg_histc_and_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        pred, label = blobby(g, (64, 96), 150)
        areas = intersect_and_union(pred, label, 150)
        expected, _ = reference_areas(pred.numpy(), label.numpy(), 150)
        assert_areas_equal(areas, expected)
        assert_areas_equal(areas, histc_areas(pred, label, 150).numpy())


def test_out_of_range_prediction_is_dropped_from_pred_area_like_histc():
    label = torch.tensor([0, 1, 1, 2, 255])
    pred = torch.tensor([0, 7, -1, 2, 9])
    areas = intersect_and_union(pred, label, 3)
    assert_areas_equal(areas, histc_areas(pred, label, 3).numpy())
    assert areas.label.tolist() == [1, 2, 1]  # class 1 keeps both pixels ...
    assert areas.pred.tolist() == [1, 0, 1]  # ... whose predictions are not counted
    assert areas.union.tolist() == [1, 2, 1]


def test_out_of_range_label_excludes_the_pixel_and_is_counted():
    label = torch.tensor([0, 5, -3, 1, 255])
    pred = torch.tensor([0, 1, 1, 1, 1])
    areas = intersect_and_union(pred, label, 3)
    assert_areas_equal(areas, [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], num_out_of_range=2)
    # mmseg would have counted the two out-of-range pixels' predictions in class 1's pred area.
    assert histc_areas(pred, label, 3)[2].tolist() == [1, 3, 0]


def test_all_ignored_image_gives_zero_areas():
    label = torch.full((8, 8), 255)
    areas = intersect_and_union(torch.zeros_like(label), label, 4)
    assert_areas_equal(areas, np.zeros((4, 4)))


def test_class_absent_from_ground_truth_but_predicted():
    label = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])
    areas = intersect_and_union(pred, label, 3)
    assert_areas_equal(areas, [[1, 2, 0], [2, 2, 1], [1, 2, 1], [2, 2, 0]])
    summary = summarize(areas)
    assert summary.per_class["IoU"][2] == 0.0
    assert math.isnan(summary.per_class["Acc"][2])
    assert summary.scalars["mAcc"] == pytest.approx((0.5 + 1.0) / 2)


def test_single_pixel():
    areas = intersect_and_union(torch.tensor([[2]]), torch.tensor([[2]]), 3)
    assert_areas_equal(areas, [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    summary = summarize(areas)
    assert summary.scalars["mIoU"] == summary.scalars["aAcc"] == 1.0
    assert np.isnan(summary.per_class["IoU"][:2]).all()


def test_empty_input_and_other_dtypes_and_custom_ignore():
    empty = intersect_and_union(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 5)
    assert_areas_equal(empty, np.zeros((4, 5)))
    pred = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    label = np.array([[0, 1], [0, 0]], dtype=np.int32)
    areas = intersect_and_union(pred, label, 2, ignore_index=0)  # numpy input, ignore a class
    assert_areas_equal(areas, [[0, 1], [0, 1], [0, 1], [0, 1]])
    no_ignore = intersect_and_union(torch.tensor([255]), torch.tensor([255]), 2, ignore_index=None)
    assert int(no_ignore.num_out_of_range) == 1


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        intersect_and_union(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="integer"):
        intersect_and_union(torch.zeros(4), torch.zeros(4, dtype=torch.long), 2)


def test_batch_equals_sum_of_images_and_split_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    pairs = [blobby(g, (32, 40), 19) for _ in range(8)]
    preds, labels = torch.stack([p for p, _ in pairs]), torch.stack([lab for _, lab in pairs])
    per_image = [intersect_and_union(p, lab, 19) for p, lab in pairs]
    batch = intersect_and_union(preds, labels, 19)
    assert torch.equal(sum(per_image).pack(), batch.pack())

    # "Two ranks" each sum an interleaved shard in a different order, then all-reduce.
    order = list(range(8))
    random.Random(0).shuffle(order)
    rank0 = sum((per_image[i] for i in order[0::2]), Areas.zeros(19))
    rank1 = sum(per_image[i] for i in reversed(order[1::2]))
    reduced = Areas.unpack(rank0.pack() + rank1.pack())
    one, two = summarize(batch), summarize(reduced)
    assert one.scalars == two.scalars  # exact, not approximate
    for key in one.per_class:
        np.testing.assert_array_equal(one.per_class[key], two.per_class[key])


def test_areas_container_round_trips():
    areas = intersect_and_union(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 9]), 3)
    stacked = areas.as_tensor()
    assert stacked.shape == (4, 3) and stacked.dtype == torch.int64
    assert torch.equal(Areas.from_tensor(stacked).as_tensor(), stacked)
    packed = areas.pack()
    assert packed.shape == (13,) and int(packed[-1]) == 1
    again = Areas.unpack(packed)
    assert torch.equal(again.as_tensor(), stacked) and int(again.num_out_of_range) == 1
    doubled = areas + areas
    assert torch.equal(doubled.as_tensor(), 2 * stacked) and int(doubled.num_out_of_range) == 2
    assert torch.equal((Areas.zeros(3) + areas).pack(), packed)
    assert areas.num_classes == 3
    with pytest.raises(ValueError):
        Areas.from_tensor(torch.zeros(3, 3))
    with pytest.raises(ValueError):
        Areas.unpack(torch.zeros(6))


# ---------------------------------------------------------------- summarize


def assert_summary_matches(summary, counts, beta=1.0, nan_to_num=None):
    scalars, per_class = reference_summary(counts, beta, nan_to_num)
    assert set(summary.scalars) == set(scalars)
    for key, value in scalars.items():
        assert isinstance(summary.scalars[key], float)
        np.testing.assert_allclose(summary.scalars[key], value, rtol=1e-12, equal_nan=True, err_msg=key)
    for key, values in summary.per_class.items():
        assert values.dtype == np.float64
        np.testing.assert_allclose(values, per_class[key], rtol=1e-12, equal_nan=True, err_msg=key)


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("nan_to_num", [None, 0.0, -1.0])
def test_summarize_matches_reference_formulas(beta, nan_to_num):
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 6, (500,), generator=g)
    label[label == 5] = 0  # classes 5 and 6: absent from ground truth, never predicted: NaN
    pred = label.clone()
    pred[torch.rand(500, generator=g) < 0.3] = 4  # class 4 over-predicted
    pred[pred == 3] = 2  # class 3 never predicted: Precision NaN, IoU 0
    label[label == 1] = 0  # class 1 only predicted: IoU 0, Acc NaN
    pred[:7] = 1
    areas = intersect_and_union(pred, label, 7)
    summary = summarize(areas, beta=beta, nan_to_num=nan_to_num)
    assert list(summary.per_class) == ["IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"]
    assert_summary_matches(summary, areas.as_tensor().numpy(), beta, nan_to_num)
    if nan_to_num is None:
        assert np.isnan(summary.per_class["IoU"][[5, 6]]).all()
        assert summary.per_class["IoU"][1] == 0.0 and summary.per_class["IoU"][3] == 0.0
        assert np.isnan(summary.per_class["Acc"][1])
        assert np.isnan(summary.per_class["Precision"][3])
        assert summary.scalars["mIoU"] == pytest.approx(np.nanmean(summary.per_class["IoU"]))
    else:
        assert not any(np.isnan(v).any() for v in summary.per_class.values())


def test_summarize_selected_metrics_and_tensor_input():
    counts = torch.tensor([[3, 0], [5, 2], [4, 2], [4, 0]])
    summary = summarize(counts, metrics="mDice")
    assert list(summary.per_class) == ["Dice", "Acc"]
    assert list(summary.scalars) == ["aAcc", "mDice", "mAcc"]
    assert summary.per_class["Dice"].tolist() == [0.75, 0.0]
    assert summary.scalars["aAcc"] == 0.75
    assert list(summarize(counts, metrics=["mFscore"]).scalars) == [
        "aAcc", "mFscore", "mPrecision", "mRecall"
    ]


def test_summarize_on_empty_areas_is_all_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize(Areas.zeros(4))
        assert all(math.isnan(v) for v in summary.scalars.values())
        assert summarize(Areas.zeros(0)).per_class["IoU"].shape == (0,)
        filled = summarize(Areas.zeros(4), nan_to_num=0)
    assert filled.scalars == dict.fromkeys(filled.scalars, 0.0)


def test_unknown_metric_lists_allowed_names():
    with pytest.raises(ValueError, match="mAP") as info:
        summarize(Areas.zeros(2), metrics=("mIoU", "mAP"))
    assert all(name in str(info.value) for name in METRICS)


def test_large_counts_stay_exact():
    big = 3 * 2**40  # far beyond float32's exact range
    counts = torch.tensor([[big - 1], [big + 1], [big], [big]], dtype=torch.int64)
    summary = summarize(counts, metrics="mIoU")
    assert summary.per_class["IoU"][0] == (big - 1) / (big + 1)


# ---------------------------------------------------------------- table


def test_format_table():
    per_class = {"IoU": np.array([0.5, 1 / 3, np.nan]), "Acc": np.array([1.0, 0.25, np.nan])}
    table = format_table(per_class, ["road", "sidewalk", "sky"])
    lines = table.splitlines()
    assert lines[0].split() == ["Class", "|", "IoU", "|", "Acc"]
    assert lines[2] == "road     | 50.00 | 100.00"
    assert [c.strip() for c in lines[3].split("|")] == ["sidewalk", "33.33", "25.00"]
    assert [c.strip() for c in lines[4].split("|")] == ["sky", "nan", "nan"]
    assert [c.strip() for c in lines[-1].split("|")] == ["mean", "41.67", "62.50"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert format_table(per_class).splitlines()[2].startswith("0 ")
    with pytest.raises(ValueError, match="2 class names for 3"):
        format_table(per_class, ["a", "b"])


def test_table_notes_column_and_top_confusions():
    matrix = np.array([[80, 12, 8], [0, 50, 0], [0, 0, 0]])
    notes = {"Top confusion": top_confusions(matrix, ["wall", "building", "sky"])}
    assert notes["Top confusion"] == ["building 12.0%", "", ""]
    per_class = {"IoU": np.array([0.8, 0.5, np.nan])}
    lines = format_table(per_class, ["wall", "building", "sky"], notes).splitlines()
    assert lines[0] == "Class    |   IoU | Top confusion"
    assert lines[2] == "wall     | 80.00 | building 12.0%"
    assert lines[3] == "building | 50.00 |"


# ---------------------------------------------------------------- confusion matrix


def test_confusion_counts_match_a_reference_and_give_the_same_areas():
    rng = np.random.default_rng(3)
    num_classes = 6
    label = rng.integers(0, num_classes + 2, size=(3, 40, 30))  # 6 and 7 are out of range
    label[:, :5] = 255
    pred = rng.integers(-1, num_classes + 1, size=label.shape)  # -1 and 6 are out of range
    counts = confusion_counts(torch.from_numpy(pred), torch.from_numpy(label), num_classes)
    assert counts.shape == (num_classes + 2, num_classes + 1) and counts.dtype == torch.int64

    reference = np.zeros((num_classes, num_classes), np.int64)
    valid = (label < num_classes) & (pred >= 0) & (pred < num_classes)
    np.add.at(reference, (label[valid], pred[valid]), 1)
    assert np.array_equal(counts[:num_classes, :num_classes].numpy(), reference)
    assert int(counts[num_classes].sum()) == int((label == 255).sum())  # the ignored row

    areas = intersect_and_union(pred, label, num_classes)
    same = areas_from_confusion(counts)
    assert torch.equal(areas.pack(), same.pack())
    halves = confusion_counts(pred[:1], label[:1], num_classes) + confusion_counts(pred[1:], label[1:], num_classes)
    assert torch.equal(halves, counts)
