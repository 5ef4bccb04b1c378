"""Binary segmentation (``data.num_classes: 1``): one sigmoid channel, BCE and Dice, a threshold,
metrics for background and foreground, 0/1 masks from predict; proven against MMSegmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RECIPES, assert_refused, cli, run_cli, tiny

from hooktrain.data.labels import LabelMapper
from hooktrain.errors import UserError
from hooktrain.models.inference import predicted_labels
from hooktrain.models.losses import HeadLoss, cross_entropy, dice
from hooktrain.recipe.data import DataConfig
from hooktrain.recipe.model import CrossEntropyLossConfig, InferenceConfig

BINARY = RECIPES / "quickstart_binary.yaml"


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 9, 11, generator=generator) * 3
    target = torch.randint(0, 2, (3, 9, 11), generator=generator)
    target[0, :2] = 255
    target[2, 4, 4:8] = 255
    return logits, target


def test_bce_dice_and_the_threshold_match_mmsegmentation(mmseg_env, tmp_path):
    logits, target = _inputs()
    torch.save({"logits": logits, "target": target, "pos_weight": 2.5, "threshold": 0.3}, tmp_path / "in.pt")
    result = mmseg_env.run(Path(__file__).parents[1] / "mmseg_ref" / "binary_reference.py",
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    mmseg = torch.load(tmp_path / "out.pt", weights_only=True)

    torch.testing.assert_close(cross_entropy(logits, target, avg_non_ignore=False), mmseg["bce"])
    torch.testing.assert_close(cross_entropy(logits, target, avg_non_ignore=True), mmseg["bce_non_ignore"])
    weighted = cross_entropy(logits, target, avg_non_ignore=False, class_weight=torch.tensor([2.5]))
    torch.testing.assert_close(weighted, mmseg["bce_weighted"])
    # The same through a head's configured loss (resize to the mask is the identity here).
    head = HeadLoss([CrossEntropyLossConfig(avg_non_ignore=False)], None, num_classes=1,
                    ignore_index=255, align_corners=False, where="model.decode_head")  # fmt: skip
    torch.testing.assert_close(head(logits, target)["loss_ce"], mmseg["bce"])

    # mmseg 1.x's DiceLoss with one channel scores the background indicator against the
    # foreground logit; ours scores the foreground (see dice's docstring).
    torch.testing.assert_close(mmseg["dice_v1"], mmseg["dice_v1_on_background"])
    assert not torch.allclose(dice(logits, target), mmseg["dice_v1"])

    labels = torch.stack([predicted_labels(image, InferenceConfig(threshold=0.3)) for image in logits])
    assert torch.equal(labels, mmseg["pred"])


def test_binary_dice_is_the_foreground_dice_over_labelled_pixels():
    logits, target = _inputs(1)
    per_image = []
    for image_logits, mask in zip(logits, target, strict=True):
        valid = mask != 255
        p = image_logits[0].sigmoid()[valid]
        t = (mask[valid] == 1).float()
        per_image.append(1 - (2 * (p * t).sum() + 1) / ((p**2).sum() + (t**2).sum() + 1))
    torch.testing.assert_close(dice(logits, target), torch.stack(per_image).mean())


def test_predicted_labels_threshold_logits_and_averaged_probabilities():
    logits = torch.tensor([[[-3.0, -0.1, 0.1, 2.0]]])  # sigmoid: 0.047 0.475 0.525 0.881
    assert predicted_labels(logits, InferenceConfig()).tolist() == [[0, 0, 1, 1]]
    assert predicted_labels(logits, InferenceConfig(threshold=0.9)).tolist() == [[0, 0, 0, 0]]
    probabilities = logits.sigmoid()  # what flip / multi-scale inference returns
    assert predicted_labels(probabilities, InferenceConfig(flip=True, threshold=0.5)).tolist() == [[0, 0, 1, 1]]
    two_classes = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    assert predicted_labels(two_classes, InferenceConfig()).tolist() == [[1, 0]]


def test_binary_masks_map_0_1_and_0_255_and_refuse_other_values():
    mask = np.array([[0, 1, 255, 1]], np.uint8)
    np.testing.assert_array_equal(LabelMapper(1)(mask), mask)
    scaled = LabelMapper(1, ignore_index=254, mask_scale=255)(np.array([[0, 255, 254, 255]], np.uint8))
    np.testing.assert_array_equal(scaled, [[0, 1, 254, 1]])
    with pytest.raises(UserError, match=r"binary mask hold values \[2\].*mask_scale: 255"):
        LabelMapper(1)(np.array([[0, 1, 2]], np.uint8), example_id="a.png")
    with pytest.raises(UserError, match=r"values \[1\].*not 0, 255"):
        LabelMapper(1, ignore_index=254, mask_scale=255)(np.array([[0, 1, 255]], np.uint8))
    ignored = LabelMapper(1, out_of_range="ignore")
    np.testing.assert_array_equal(ignored(np.array([[0, 7, 1]], np.uint8)), [[0, 255, 1]])
    data = DataConfig(num_classes=1, class_names=["lesion"], train={"source": {"type": "shapes"}})
    assert (data.binary, data.num_labels, data.names) == (True, 2, ["background", "lesion"])


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["model.inference.threshold=1.5"], ["model.inference.threshold", "less than 1"]),
        (["data.mask_scale=255"], ["mask_scale 255 is also ignore_index", "254"]),
        (["data.num_classes=5", "data.mask_scale=255"], ["mask_scale is for binary masks"]),
        (["data.label_map={}"], ["binary mask hold values [", "mask_scale: 255"]),
    ],
    ids=["threshold", "mask-scale-is-ignore", "mask-scale-multiclass", "mask-values"],
)
def test_bad_binary_settings_are_one_line_errors(tmp_path, data_root, options, fragments):
    if options[0].startswith("data.num_classes"):
        options += ["data.class_names=null", "data.palette=null"]
    result = run_cli(str(BINARY), "--work-dir", str(tmp_path / "run"), "--cfg-options",
                     *tiny(data_root, 2), *options)  # fmt: skip
    assert_refused(result, *fragments)


def test_binary_quickstart_trains_scores_both_labels_and_predicts_0_1_masks(tmp_path, data_root, capsys):
    import cv2

    work = tmp_path / "run"
    result = run_cli(str(BINARY), "--work-dir", str(work), "--cfg-options", *tiny(data_root, 8),
                     "hooks.1.interval=8", "hooks.2.interval=8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shape" in result.stdout and "background" in result.stdout  # the per-class table
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if "val/mIoU" in row][-1]
    iou = final["val/per_class"]["IoU"]
    assert len(iou) == 2 and final["val/mIoU"] == pytest.approx(np.nanmean(iou))
    assert final["val/fgIoU"] == iou[1] and final["val/fgDice"] == final["val/per_class"]["Dice"][1]
    assert np.isfinite(final["val/loss"])
    confusion = (work / "confusion" / "confusion_iter_8.csv").read_text().splitlines()
    assert confusion[0].split(",")[1:] == ["background", "shape"]

    exported = tmp_path / "model.safetensors"
    assert cli(capsys, "export", work / "checkpoints" / "iter_8", exported).returncode == 0
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    result = cli(capsys, "predict", exported, images, "--out", tmp_path / "masks")
    assert result.returncode == 0, result.stderr[-3000:]
    label = cv2.imread(str(tmp_path / "masks" / "a_label.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (40, 56) and set(np.unique(label)) <= {0, 1}
