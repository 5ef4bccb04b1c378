"""Test-time augmentation (``model.inference.scales`` / ``flip``, ``hooktrain test --tta``)
against a reference written straightforwardly from MMSegmentation 1.x's algorithm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EVAL_COMMAND_GROUP, QUICKSTART, randomise, run_cli, tiny
from safetensors.torch import save_file

from hooktrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ValPipelineConfig,
    ValTransform,
    scaled_size,
)
from hooktrain.data.val import ScaledViews, make_val_collate
from hooktrain.errors import UserError
from hooktrain.evaluation.validation import predict_batch
from hooktrain.models import ModelConfig, build_segmentor
from hooktrain.recipe.model import InferenceConfig
from hooktrain.recipe.schema import dump_recipe, load_recipe

NUM_CLASSES = 5
MMSEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def tiny_model(inference: dict, align_corners: bool = False):
    head = {
        "type": "fpn",
        "channels": 16,
        "fpn_channels": 16,
        "align_corners": align_corners,
    }
    cfg = {
        "encoder": {"name": "resnet18", "out_indices": [1, 2, 3]},
        "decode_head": head,
        "inference": inference,
    }
    torch.manual_seed(0)
    return randomise(
        build_segmentor(ModelConfig.model_validate(cfg), num_classes=NUM_CLASSES)
    )


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 RGB image (noise blurred, so resizing matters)."""
    noise = np.random.default_rng(seed).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    return cv2.GaussianBlur(noise, (5, 5), 1.5)


# --- the reference: mmseg 1.x's TestTimeAug + EncoderDecoder + SegTTAModel, written out -------


def mmcv_rescale_by_factor(image: np.ndarray, factor: float) -> np.ndarray:
    """mmcv Resize(scale_factor=factor, keep_ratio=True): the target size (w, h) rounded half
    up, then imrescale fits the image into it keeping ratio (rescale_size), cv2 bilinear."""
    h, w = image.shape[:2]
    target = (int(w * factor + 0.5), int(h * factor + 0.5))
    fit = min(max(target) / max(h, w), min(target) / min(h, w))
    new_w, new_h = int(w * fit + 0.5), int(h * fit + 0.5)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def mmseg_slide(model, inputs: torch.Tensor, crop, stride) -> torch.Tensor:
    """EncoderDecoder.slide_inference, as written in mmseg."""
    (h_stride, w_stride), (h_crop, w_crop) = stride, crop
    _, _, h_img, w_img = inputs.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((1, NUM_CLASSES, h_img, w_img))
    count = inputs.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = model(inputs[:, :, y1:y2, x1:x2])
            preds += F.pad(logits, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@torch.no_grad()
def reference_tta(
    model, image: np.ndarray, scales, flip: bool, inference: dict
) -> torch.Tensor:
    """Mean softmax over every (scale, flip) variant, at the original size."""
    height, width = image.shape[:2]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    total, count = torch.zeros(NUM_CLASSES, height, width), 0
    for factor in scales:
        resized = mmcv_rescale_by_factor(image, factor)
        for flipped in (False, True) if flip else (False,):
            # RandomFlip flips the uint8 image; the data preprocessor normalises it.
            img = np.ascontiguousarray(resized[:, ::-1]) if flipped else resized
            pixels = torch.from_numpy(img).permute(2, 0, 1).float()
            inputs = ((pixels - mean) / std)[None]
            if inference.get("mode", "whole") == "slide":
                logits = mmseg_slide(
                    model, inputs, inference["crop_size"], inference["stride"]
                )
            else:
                logits = model(inputs)
            # postprocess_result: flip back, resize to the original size
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(
                logits,
                (height, width),
                mode="bilinear",
                align_corners=model.align_corners,
            )
            total += logits[0].softmax(dim=0)  # SegTTAModel.merge_preds
            count += 1
    return total / count


# --- (a) hooktrain's path equals the reference -------------------------------------------------


def test_scaled_size_follows_mmcvs_two_step_rounding():
    # Target (int(22 * 1.25 + .5), int(21 * 1.25 + .5)) = (28, 26) is then fitted keeping ratio:
    # factor min(28 / 22, 26 / 21) = 26 / 21, so the width is int(22 * 26 / 21 + .5) = 27, not 28.
    assert scaled_size(21, 22, 1.25) == (26, 27)
    assert scaled_size(97, 131, 1.25) == (121, 163)
    for h, w, r in ((97, 131, 0.5), (97, 131, 1.75), (480, 640, 0.75), (333, 500, 1.5)):
        assert (
            scaled_size(h, w, r)
            == mmcv_rescale_by_factor(np.zeros((h, w, 3), np.uint8), r).shape[:2]
        )
    with pytest.raises(UserError, match="model.inference.scales"):
        scaled_size(3, 5, 0.1)


CASES = {
    "whole": ({"mode": "whole"}, False),
    "slide": ({"mode": "slide", "crop_size": [64, 64], "stride": [56, 48]}, False),
    "whole_align_corners": ({"mode": "whole"}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multiscale_flip_matches_the_mmseg_reference(case):
    inference, align_corners = CASES[case]
    model = tiny_model(
        {**inference, "scales": MMSEG_SCALES, "flip": True}, align_corners
    )
    images = [random_image(97, 131, seed=1), random_image(61, 45, seed=2)]
    # The val pipeline's resize plays no part in the multi-scale test.
    transform = ValTransform(ValPipelineConfig(scale=(64, 32)))
    examples = []
    for i, image in enumerate(images):
        tensor, mask = transform(image, np.zeros(image.shape[:2], np.int64))
        examples.append({"image": tensor, "mask": mask, "index": i, "ori_shape": image.shape[:2],
                         "worker": 0, "corrupt": 0, "views": ScaledViews(image, MMSEG_SCALES, transform)})  # fmt: skip
    # The val loader's batch, through the evaluation's path (eval hook and hooktrain test).
    batch = make_val_collate(255)(examples)
    got = predict_batch(model, batch, torch.device("cpu"))
    for image, scores in zip(images, got):
        want = reference_tta(model, image, MMSEG_SCALES, True, inference)
        assert scores.shape == want.shape == (NUM_CLASSES, *image.shape[:2])
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=2e-6)
        assert torch.allclose(scores.sum(0), torch.ones(image.shape[:2]), atol=1e-5)


def test_scales_without_flip_and_one_image_at_a_time():
    model = tiny_model({"scales": [0.6, 1.3]})
    image = random_image(50, 70)
    transform = ValTransform(ValPipelineConfig())
    made = []

    def views():  # the views are made lazily, one per scale
        for tensor in ScaledViews(image, [0.6, 1.3], transform):
            made.append(tuple(tensor.shape))
            yield tensor[None]

    from hooktrain.models.inference import predict_scales

    scores = predict_scales(
        model.logits, views(), image.shape[:2], model.inference, model.align_corners
    )
    assert made == [(3, 30, 42), (3, 65, 91)]
    torch.testing.assert_close(
        scores, reference_tta(model, image, [0.6, 1.3], False, {}), rtol=1e-5, atol=2e-6
    )


def test_predict_without_the_original_images_refuses_scales():
    model = tiny_model({"scales": [1.0]})
    with pytest.raises(ValueError, match="predict_scales"):
        model.predict(torch.zeros(1, 3, 32, 32), [(32, 32)], [(32, 32)])


# --- (c) flip alone averages probabilities -----------------------------------------------------


def test_flip_alone_averages_probabilities_of_the_val_image():
    model = tiny_model({"flip": True})
    image = torch.randn(2, 3, 48, 64)
    img_shapes, ori_shapes = [(48, 64), (40, 56)], [(97, 131), (50, 70)]
    got = model.predict(image, img_shapes, ori_shapes)
    for i, ((h, w), ori) in enumerate(zip(img_shapes, ori_shapes)):
        crop = image[i : i + 1, :, :h, :w]
        with torch.no_grad():
            variants = [model(crop), model(crop.flip(-1)).flip(-1)]
        resized = [F.interpolate(v, ori, mode="bilinear")[0] for v in variants]
        torch.testing.assert_close(
            got[i], (resized[0].softmax(0) + resized[1].softmax(0)) / 2
        )
        logit_mean = (resized[0] + resized[1]) / 2  # what flip used to average
        assert not torch.allclose(got[i], logit_mean.softmax(0))
    model.inference = model.inference.model_copy(update={"flip": False})
    plain = model.predict(image, img_shapes, ori_shapes)[0]  # logits, not probabilities
    assert not torch.allclose(plain, got[0]) and plain.sum(0).std() > 0


def test_one_output_channel_averages_sigmoids():
    from hooktrain.models.inference import ProbabilityMean

    mean = ProbabilityMean((8, 8), align_corners=False)
    a, b = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    mean.add(a)
    mean.add(b)
    up = [F.interpolate(x, (8, 8), mode="bilinear")[0] for x in (a, b)]
    torch.testing.assert_close(mean.mean(), (up[0].sigmoid() + up[1].sigmoid()) / 2)


# --- (d) the recipe key ----------------------------------------------------------------------


def test_bad_scales_are_one_line_errors_naming_the_key():
    for value in ("[0.5, -1.0]", "[]", "[0]"):
        with pytest.raises(UserError) as error:
            load_recipe(QUICKSTART, [f"model.inference.scales={value}"])
        message = str(error.value)
        assert (
            "\n" not in message
            and "model.inference.scales" in message
            and "factors > 0" in message
        )
    result = run_cli(
        "config", str(QUICKSTART), "--cfg-options", "model.inference.scales=[1, -0.5]"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model.inference.scales" in result.stderr and "[1.0, -0.5]" in result.stderr


def test_with_tta_keeps_the_recipes_scales_or_takes_mmsegs():
    assert InferenceConfig().with_tta().scales == MMSEG_SCALES
    assert InferenceConfig(scales=[1.0, 2.0]).with_tta().model_dump()["scales"] == [
        1.0,
        2.0,
    ]
    assert (
        InferenceConfig(mode="slide").with_tta().flip
        and InferenceConfig().scales is None
    )


# --- (b) hooktrain test --tta and hooktrain predict end to end ---------------------------------


def export_random_model(tmp_path: Path, *options: str) -> Path:
    """An exported file (weights + recipe, as `hooktrain export` writes) of a random quickstart model."""
    from hooktrain.deploy.export import export_checkpoint

    recipe = load_recipe(QUICKSTART, list(options))
    torch.manual_seed(3)
    model = randomise(
        build_segmentor(recipe.model, num_classes=recipe.data.num_classes, in_channels=recipe.data.in_channels)
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_4"
    checkpoint.mkdir(parents=True)
    save_file(model.state_dict(), checkpoint / "model.safetensors")
    (checkpoint / "recipe.yaml").write_text(dump_recipe(recipe))
    return export_checkpoint(checkpoint, tmp_path / "model.safetensors")


@pytest.mark.xdist_group(EVAL_COMMAND_GROUP)
def test_test_command_tta_on_one_and_two_processes(eval_command_runs):
    """``hooktrain test --tta`` of a random model on 1 process changes the metrics of its run
    without (test_eval.py's 1-process run), and under ``accelerate launch`` on 2 gives the same."""
    single, tta = eval_command_runs.metrics(1, tta=False), eval_command_runs.metrics(1, tta=True)
    assert tta["tta"] == {"scales": MMSEG_SCALES, "flip": True} and "tta" not in single
    assert "mIoU" in tta and tta["mIoU"] == tta["mIoU"]  # not NaN
    assert any(tta[k] != single[k] for k in ("aAcc", "mIoU", "mAcc"))
    double = eval_command_runs.metrics(2, tta=True)
    assert double.keys() == tta.keys()
    for key in set(tta) - {"checkpoint", "tta"}:  # exact: the areas are integer sums
        assert tta[key] == double[key] or (
            math.isnan(tta[key]) and math.isnan(double[key])
        ), key


def test_predict_honours_the_recipes_scales_and_flip(tmp_path):
    scales = [0.75, 1.25]
    exported = export_random_model(
        tmp_path, f"model.inference.scales={scales}", "model.inference.flip=true"
    )
    image = random_image(41, 59, seed=5)
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    result = run_cli(
        "predict", str(exported), str(images), "--out", str(tmp_path / "masks")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    label = cv2.imread(str(tmp_path / "masks" / "a_label.png"), cv2.IMREAD_UNCHANGED)

    from hooktrain.deploy.export import load_exported

    model, recipe = load_exported(exported)
    assert recipe.model.inference.scales == scales
    want = reference_tta(model, image, scales, True, {}).argmax(0).numpy()
    assert label.shape == image.shape[:2]
    assert (label == want).mean() > 0.999


def test_val_loader_carries_views_only_with_scales(data_root):
    from hooktrain.data import build_val_loader
    from hooktrain.data.sources import prepare_data

    recipe = load_recipe(QUICKSTART, tiny(data_root))
    prepare_data(recipe.data)
    plain = next(iter(build_val_loader(recipe.data)))
    assert "views" not in plain
    batch = next(iter(build_val_loader(recipe.data, scales=[0.5, 1.5])))
    views = batch["views"][0]
    assert len(views) == 2 and [tuple(v.shape) for v in views] == [
        (3, 16, 16),
        (3, 48, 48),
    ]


# --- against MMSegmentation 1.2.2's own TestTimeAug and SegTTAModel ---------------------------

SEGFORMER = "segformer_mit-b0_8xb2-160k_ade20k-512x512"
SLIDE = (64, 64, 48, 48)  # crop h, w and stride h, w


@pytest.fixture(scope="module")
def mmseg_tta(mmseg_env, tmp_path_factory) -> Path:
    """MMSegmentation's TTA of a random SegFormer-B0 on a 97x131 PNG, whole and slide."""
    out = tmp_path_factory.mktemp("mmseg_tta")
    cv2.imwrite(
        str(out / "image.png"),
        cv2.cvtColor(random_image(97, 131, seed=7), cv2.COLOR_RGB2BGR),
    )
    script = Path(__file__).parents[1] / "mmseg_ref" / "tta_reference.py"
    mmseg_env.run(script, "predict", SEGFORMER, str(out / "image.png"), str(out), "--seed", "0",
                  "--slide", *map(str, SLIDE))  # fmt: skip
    mmseg_env.run(script, "sizes", str(out / "sizes.json"))
    return out


def test_scaled_size_is_mmcvs_resize(mmseg_tta):
    sizes = json.loads((mmseg_tta / "sizes.json").read_text())
    assert len(sizes) == 70
    for key, size in sizes.items():
        shape, factor = key.split("@")
        height, width = (int(v) for v in shape.split("x"))
        assert list(scaled_size(height, width, float(factor))) == size, key


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_tta_equals_mmsegmentations_segttamodel(mmseg_tta, mode, tmp_path):
    from hooktrain.data.labels import decode_image
    from hooktrain.deploy.convert import convert
    from hooktrain.deploy.export import load_exported
    from hooktrain.models.inference import predict_scales

    options = ["model.inference.flip=true", f"model.inference.scales={MMSEG_SCALES}"]
    if mode == "slide":
        options += ["model.inference.mode=slide", f"model.inference.crop_size=[{SLIDE[0]},{SLIDE[1]}]",
                    f"model.inference.stride=[{SLIDE[2]},{SLIDE[3]}]"]  # fmt: skip
    recipe_path = QUICKSTART.parent / "mmseg" / f"{SEGFORMER}.yaml"
    model, recipe = load_exported(
        convert(
            "mmseg",
            str(mmseg_tta / "checkpoint.pth"),
            str(recipe_path),
            tmp_path / "m.safetensors",
            options,
        )
    )
    reference = torch.load(
        mmseg_tta / ("tta.pt" if mode == "whole" else "tta_slide.pt")
    )
    image = decode_image((mmseg_tta / "image.png").read_bytes())
    transform = ValTransform(
        recipe.data.val.pipeline, mean=recipe.data.mean, std=recipe.data.std
    )
    views = [transform.rescaled(image, r) for r in MMSEG_SCALES]
    assert [(tuple(v.shape[1:]), f) for v in views for f in (False, True)] == reference[
        "variants"
    ]
    probs = predict_scales(
        model.logits,
        (v[None] for v in views),
        image.shape[:2],
        model.inference,
        model.align_corners,
    )
    assert probs.shape == reference["probs"].shape == (150, 97, 131)
    torch.testing.assert_close(probs, reference["probs"], rtol=1e-4, atol=1e-6)
    assert (probs.argmax(0) == reference["pred"]).float().mean() > 0.999
