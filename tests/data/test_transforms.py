"""Joint image/mask transforms, decoding and label mapping against MMSegmentation semantics."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmseg_ref.draws import MmsegDraws
from PIL import Image
from pydantic import ValidationError

from hooktrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabelMapper,
    TrainPipelineConfig,
    TrainTransform,
    ValPipelineConfig,
    ValTransform,
    decode_image,
    decode_mask,
    rescaled_size,
    shortest_edge_size,
)
from hooktrain.errors import UserError

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)


# ---------------------------------------------------------------- helpers


def mmseg_reference(image_rgb, mask, rng, cfg: TrainPipelineConfig, ignore_index=255):
    """MMSegmentation's train pipeline written out literally (BGR inside, as mmcv loads it),
    drawing from ``rng`` where mmseg draws from ``np.random``."""
    img = np.ascontiguousarray(image_rgb[:, :, ::-1])
    seg = mask
    # RandomResize (mmcv Resize + rescale_size, keep_ratio)
    lo, hi = cfg.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    scale = int(cfg.scale[0] * ratio), int(cfg.scale[1] * ratio)
    h, w = img.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = int(w * factor + 0.5), int(h * factor + 0.5)
    img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)
    # RandomCrop
    ch, cw = cfg.crop_size

    def bbox():
        oy = rng.integers(0, max(img.shape[0] - ch, 0) + 1)
        ox = rng.integers(0, max(img.shape[1] - cw, 0) + 1)
        return oy, oy + ch, ox, ox + cw

    y1, y2, x1, x2 = bbox()
    if cfg.cat_max_ratio < 1.0:
        for _ in range(10):
            labels, cnt = np.unique(seg[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cfg.cat_max_ratio:
                break
            y1, y2, x1, x2 = bbox()
    img, seg = img[y1:y2, x1:x2], seg[y1:y2, x1:x2]
    # RandomFlip
    if rng.random() < cfg.flip_prob:
        img, seg = np.flip(img, axis=1), np.flip(seg, axis=1)
    # PhotoMetricDistortion
    if cfg.photometric:
        img = _reference_photometric(np.ascontiguousarray(img), rng, cfg)
    # SegDataPreProcessor: bgr_to_rgb, (x - mean) / std, pad with 0 / 255
    rgb = img[:, :, ::-1].astype(np.float32)
    norm = (rgb - MEAN) / STD
    out = np.zeros((ch, cw, 3), np.float32)
    out[: norm.shape[0], : norm.shape[1]] = norm
    out_seg = np.full((ch, cw), ignore_index, np.int64)
    out_seg[: seg.shape[0], : seg.shape[1]] = seg
    return out.transpose(2, 0, 1), out_seg


def _reference_photometric(img, rng, cfg):
    def convert(x, alpha=1, beta=0):
        x = x.astype(np.float32) * alpha + beta
        return np.clip(x, 0, 255).astype(np.uint8)

    def contrast(x):
        if rng.integers(2):
            return convert(x, alpha=rng.uniform(*cfg.contrast_range))
        return x

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=rng.uniform(*cfg.saturation_range))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + rng.integers(-cfg.hue_delta, cfg.hue_delta)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img


def scene(h=96, w=128, seed=0):
    """A colourful image with blob-shaped classes 0..5 and an ignored patch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1).astype(np.float32)
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for label in range(1, 6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 30)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = label
    mask[: h // 8, : w // 8] = 255
    return image, mask


SMALL = dict(scale=(256, 96), crop_size=(64, 64))


# ---------------------------------------------------------------- train pipeline


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.int64])
def test_train_matches_mmseg_reference_bit_for_bit(mask_dtype):
    """Against ``mmseg_reference`` above, a literal port of MMSegmentation's steps drawing from a
    ``Generator``: masks bit for bit, normalised images within 1e-5, 150 seeds over 7 scenes
    (40 with int64 masks). MMSegmentation's own code is compared in the next test."""
    cfg = TrainPipelineConfig(**SMALL)
    transform = TrainTransform(cfg)
    seeds = range(150) if mask_dtype is np.uint8 else range(40)
    for seed in seeds:
        image, mask = scene(seed=seed % 7)
        mask = mask.astype(mask_dtype)
        ref_img, ref_mask = mmseg_reference(image, mask, np.random.default_rng(seed), cfg)
        out_img, out_mask = transform(image, mask, np.random.default_rng(seed))
        assert out_img.dtype == torch.float32 and out_mask.dtype == torch.int64
        assert out_img.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        np.testing.assert_array_equal(out_mask.numpy(), ref_mask, err_msg=f"seed {seed}")
        np.testing.assert_allclose(out_img.numpy(), ref_img, rtol=0, atol=1e-5, err_msg=f"seed {seed}")


def test_train_matches_mmsegmentations_own_transforms(mmseg_env, tmp_path):
    """MMSegmentation 1.2.2's registered RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip ->
    PhotoMetricDistortion -> PackSegInputs and its SegDataPreProcessor (normalise, pad), run in
    its own environment after ``np.random.seed(s)``, against ``TrainTransform`` drawing the same
    numbers: 60 seeds over 7 scenes (96x128, blobs of 6 classes and an ignored patch). Masks and
    normalised images are compared bit for bit."""
    cfg = TrainPipelineConfig(**SMALL)
    scenes = [scene(seed=k) for k in range(7)]
    inputs, out = tmp_path / "inputs.npz", tmp_path / "mmseg.npz"
    np.savez(inputs, **{f"{kind}_{k}": array for k, pair in enumerate(scenes)
                        for kind, array in zip(("image", "mask"), pair)})  # fmt: skip
    script = Path(__file__).parents[1] / "mmseg_ref" / "transforms_reference.py"
    mmseg_env.run(script, str(inputs), str(out), "--seeds", "60", "--scale", *map(str, cfg.scale),
                  "--ratio", *map(str, cfg.ratio_range), "--crop", *map(str, cfg.crop_size))  # fmt: skip
    reference = np.load(out)
    transform = TrainTransform(cfg)
    for seed in range(60):
        image, mask = scenes[seed % 7]
        ours_img, ours_mask = transform(image, mask, MmsegDraws(seed))
        np.testing.assert_array_equal(ours_mask.numpy(), reference[f"mask_{seed}"], err_msg=f"seed {seed}")
        np.testing.assert_array_equal(ours_img.numpy(), reference[f"image_{seed}"], err_msg=f"seed {seed}")


# Mask2Former's RandomChoiceResize(ResizeShortestEdge) at test size: a landscape, a portrait, a square
# and a 40x200 strip whose long edge hits max_size at every scale (the cap, then mmcv's refit).
SHORTEST_EDGE = dict(resize={"type": "shortest_edge_choice", "scales": [64, 72, 80, 96, 112, 128], "max_size": 160},
                     crop_size=(64, 64))  # fmt: skip
SHORTEST_EDGE_SIZES = [(96, 128), (128, 96), (100, 100), (40, 200)]


def test_shortest_edge_choice_matches_mmsegmentations_own_transforms(mmseg_env, tmp_path):
    """mmcv's RandomChoiceResize(scales, resize_type='ResizeShortestEdge', max_size) (mmseg's
    Mask2Former train pipeline) -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion
    and SegDataPreProcessor, run in MMSegmentation 1.2.2's environment after ``np.random.seed(s)``,
    against ``TrainTransform`` with ``resize: shortest_edge_choice`` drawing the same numbers: 80
    seeds over 4 scenes (landscape, portrait, square, and a strip whose long edge is capped).
    Masks bit for bit (so the same sizes, crops and flips); normalised images within one uint8
    step (1 / std), a bound for OpenCV's resize and HSV code, which both sides run (measured: 0)."""
    cfg = TrainPipelineConfig(**SHORTEST_EDGE)
    scenes = [scene(h, w, seed=k) for k, (h, w) in enumerate(SHORTEST_EDGE_SIZES)]
    inputs, out = tmp_path / "inputs.npz", tmp_path / "mmseg.npz"
    np.savez(inputs, **{f"{kind}_{k}": array for k, pair in enumerate(scenes)
                        for kind, array in zip(("image", "mask"), pair)})  # fmt: skip
    script = Path(__file__).parents[1] / "mmseg_ref" / "transforms_reference.py"
    mmseg_env.run(script, str(inputs), str(out), "--seeds", "80", "--choice-scales", *map(str, cfg.resize.scales),
                  "--max-size", str(cfg.resize.max_size), "--crop", *map(str, cfg.crop_size))  # fmt: skip
    reference = np.load(out)
    transform = TrainTransform(cfg)
    step = 1 / float(STD.min())
    for seed in range(80):
        image, mask = scenes[seed % len(scenes)]
        ours_img, ours_mask = transform(image, mask, MmsegDraws(seed))
        np.testing.assert_array_equal(ours_mask.numpy(), reference[f"mask_{seed}"], err_msg=f"seed {seed}")
        np.testing.assert_allclose(ours_img.numpy(), reference[f"image_{seed}"], rtol=0, atol=step,
                                   err_msg=f"seed {seed}")  # fmt: skip


@pytest.mark.parametrize(
    ("size", "short_edge", "expected"),
    [
        ((512, 683), 256, (256, 342)),  # landscape: the short side is the scale
        ((683, 512), 1024, (1366, 1024)),  # portrait
        ((512, 512), 307, (307, 307)),
        ((300, 2000), 1024, (307, 2047)),  # capped: target 2048x307, which mmcv's keep-ratio refit makes 2047x307
    ],
)
def test_shortest_edge_size_caps_the_long_edge_as_mmseg_does(size, short_edge, expected):
    assert shortest_edge_size(*size, short_edge, 2048) == expected


def test_shortest_edge_choice_draws_each_scale_and_keeps_image_and_mask_aligned():
    """Every scale is drawn (one ``integers`` draw each), and the resized mask is the image's
    nearest-neighbour twin: a flat two-colour image crops to the matching labels."""
    cfg = TrainPipelineConfig(resize={"type": "shortest_edge_choice", "scales": [40, 80], "max_size": 400},
                              crop_size=(32, 32), photometric=False, cat_max_ratio=1.0)  # fmt: skip
    image = np.zeros((60, 90, 3), np.uint8)
    image[:, 45:] = 200
    mask = np.zeros((60, 90), np.uint8)
    mask[:, 45:] = 1
    seen = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        seen.add(cfg.resize.scales[int(np.random.default_rng(seed).integers(2))])
        img, out_mask = TrainTransform(cfg)(image, mask, rng)
        bright = img[0].numpy() > 0
        assert (bright == (out_mask.numpy() == 1)).mean() > 0.95
    assert seen == {40, 80}


def test_shortest_edge_choice_config_is_checked():
    with pytest.raises(ValidationError, match="crop_size"):
        TrainPipelineConfig(resize={"type": "shortest_edge_choice", "scales": [32, 48]}, crop_size=(64, 64))
    with pytest.raises(ValidationError, match="scales"):
        TrainPipelineConfig(resize={"type": "shortest_edge_choice", "scales": []})
    with pytest.raises(ValidationError, match="positive"):
        TrainPipelineConfig(resize={"type": "shortest_edge_choice", "scales": [0, 512]})
    assert TrainPipelineConfig().resize is None  # the default stays RandomResize


PALETTE = np.array([[230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [25, 230, 230], [230, 25, 230]])


def test_image_and_mask_stay_aligned_through_resize_crop_flip_and_pad():
    # Flat rectangles whose colour encodes the label, in an asymmetric layout so a flip of
    # only one of the two would show.
    h, w = 90, 120
    mask = np.zeros((h, w), np.uint8)
    for i, (y0, y1, x0, x1) in enumerate([(0, 40, 0, 30), (0, 90, 30, 50), (40, 90, 0, 30), (0, 30, 50, 120), (30, 90, 50, 95), (30, 90, 95, 120)]):
        mask[y0:y1, x0:x1] = i
    image = PALETTE[mask].astype(np.uint8)
    cfg = TrainPipelineConfig(scale=(240, 90), ratio_range=(0.5, 2.0), crop_size=(72, 72), photometric=False, cat_max_ratio=1.0)
    transform = TrainTransform(cfg)
    flips = set()
    for seed in range(120):
        out_img, out_mask = transform(image, mask, np.random.default_rng(seed))
        rgb = out_img.numpy().transpose(1, 2, 0) * STD + MEAN
        m = out_mask.numpy()
        padded = m == 255
        assert np.all(out_img.numpy()[:, padded] == 0)
        # interior pixels: the 5x5 neighbourhood has a single label
        interior = ~padded
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                interior &= np.roll(m, (dy, dx), axis=(0, 1)) == m
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
        nearest = np.argmin(((rgb[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1), axis=-1)
        assert interior.sum() > 100
        np.testing.assert_array_equal(nearest[interior], m[interior], err_msg=f"seed {seed}")
        # label 0 is left of label 3's column when not flipped (rows where both appear)
        cols0, cols3 = np.nonzero(m == 0)[1], np.nonzero(m == 3)[1]
        if len(cols0) and len(cols3):
            flips.add(bool(cols0.mean() > cols3.mean()))
    assert flips == {True, False}


def test_cat_max_ratio_retries_towards_balanced_crops():
    # Class 1 is a 48-column band in a 256x256 class-0 image; about a third of 64x64 crops
    # hold between 25% and 75% of it, the rest are dominated by one class.
    mask = np.zeros((256, 256), np.uint8)
    mask[:, 100:148] = 1
    image = np.zeros((256, 256, 3), np.uint8)

    def balanced_share(cat_max_ratio):
        cfg = TrainPipelineConfig(scale=(256, 256), ratio_range=(1.0, 1.0), crop_size=(64, 64),
                                  cat_max_ratio=cat_max_ratio, photometric=False, flip_prob=0.0)
        transform = TrainTransform(cfg)
        ok = 0
        for seed in range(300):
            _, m = transform(image, mask, np.random.default_rng(seed))
            counts = np.bincount(m.numpy().ravel(), minlength=2)
            ok += len(counts[counts > 0]) > 1 and counts.max() / counts.sum() < 0.75
        return ok / 300

    assert balanced_share(0.75) > 0.9  # 1 - 0.68**11 ~ 0.985 in theory
    assert balanced_share(1.0) < 0.5  # 62/193 ~ 0.32 without retries


@pytest.mark.parametrize(("h", "w", "crop"), [(40, 50, (40, 96)), (50, 40, (96, 40))])
def test_padding_uses_zero_for_image_after_normalisation_and_ignore_for_mask(h, w, crop):
    # A crop longer than the image along one side (a crop larger on both sides than any image
    # the resize makes is refused by the recipe schema: the crop would do nothing).
    image, mask = scene(h=h, w=w, seed=3)
    cfg = TrainPipelineConfig(scale=(50, 40), ratio_range=(1.0, 1.0), crop_size=crop, photometric=False, flip_prob=0.0)
    out_img, out_mask = TrainTransform(cfg, ignore_index=255)(image, mask, np.random.default_rng(0))
    img, m = out_img.numpy(), out_mask.numpy()
    assert img.shape == (3, *crop) and m.shape == crop
    expected = ((image.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(img[:, :h, :w], expected, atol=1e-6)
    np.testing.assert_array_equal(m[:h, :w], mask)
    assert np.all(img[:, h:] == 0) and np.all(img[:, :, w:] == 0)
    assert np.all(m[h:] == 255) and np.all(m[:, w:] == 255)
    assert (crop[0] > h) != (crop[1] > w)  # exactly one side padded


class ScriptedRng:
    """Hands out scripted draws and checks that they are asked for in this order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def _next(self, method, *args):
        expected, value = self.draws.pop(0)
        assert expected == method, f"asked for {method}{args}, script has {expected}"
        return value

    def random(self):
        return self._next("random")

    def integers(self, *args):
        return self._next("integers", *args)

    def uniform(self, *args):
        return self._next("uniform", *args)


@pytest.mark.parametrize(("hue", "shift", "expected"), [(175, 10, 5), (3, -10, 173)])
def test_hue_shift_wraps_around_in_opencv_units(hue, shift, expected):
    hsv = np.full((8, 8, 3), (hue, 255, 200), np.uint8)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    cfg = TrainPipelineConfig(scale=(8, 8), ratio_range=(1.0, 1.0), crop_size=(8, 8))
    rng = ScriptedRng(
        ("random", 0.0),  # resize ratio
        ("integers", 0), ("integers", 0),  # crop offsets (cat_max_ratio: one class -> retries)
        *[("integers", 0)] * 20,
        ("random", 0.9),  # no flip
        ("integers", 0),  # no brightness
        ("integers", 0),  # mode 0: contrast last
        ("integers", 0),  # no saturation
        ("integers", 1), ("integers", shift),  # hue
        ("integers", 0),  # no contrast
    )
    out, _ = TrainTransform(cfg)(image, np.zeros((8, 8), np.uint8), rng)
    assert rng.draws == []
    rgb = np.rint(out.numpy().transpose(1, 2, 0) * STD + MEAN).astype(np.uint8)
    got = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, 0, 0]
    assert min(abs(int(got) - expected), 180 - abs(int(got) - expected)) <= 1


def test_brightness_and_contrast_clip_and_truncate_like_mmseg():
    image = np.array([[[0, 100, 250]]], np.uint8).repeat(4, 0).repeat(4, 1)
    cfg = TrainPipelineConfig(scale=(4, 4), ratio_range=(1.0, 1.0), crop_size=(4, 4), cat_max_ratio=1.0)
    rng = ScriptedRng(
        ("random", 0.0), ("integers", 0), ("integers", 0), ("random", 0.9),
        ("integers", 1), ("uniform", 10.7),  # brightness +10.7 -> 10, 110, 255 (clipped)
        ("integers", 1),  # mode 1: contrast first
        ("integers", 1), ("uniform", 0.5),  # contrast x0.5 -> 5, 55, 127
        ("integers", 0), ("integers", 0),  # no saturation, no hue
    )
    out, _ = TrainTransform(cfg)(image, np.zeros((4, 4), np.uint8), rng)
    rgb = out.numpy()[:, 0, 0] * STD + MEAN
    np.testing.assert_allclose(rgb, [5, 55, 127], atol=1e-3)


def test_same_rng_seed_gives_same_sample_and_global_rng_is_untouched():
    image, mask = scene()
    transform = TrainTransform(TrainPipelineConfig(**SMALL))
    state = np.random.get_state()
    a = transform(image, mask, np.random.default_rng(5))
    b = transform(image, mask, np.random.default_rng(5))
    c = transform(image, mask, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_image_and_mask_of_different_sizes_are_a_user_error():
    image, mask = scene()
    with pytest.raises(UserError, match="ade_7.*96x128.*95x128"):
        TrainTransform(TrainPipelineConfig(**SMALL))(image, mask[:-1], np.random.default_rng(0), example_id="ade_7")


def test_config_rejects_inverted_ranges_and_unknown_keys():
    with pytest.raises(ValidationError, match="ratio_range"):
        TrainPipelineConfig(ratio_range=(2.0, 0.5))
    with pytest.raises(ValidationError):
        TrainPipelineConfig(crop=(512, 512))
    with pytest.raises(ValidationError):
        TrainPipelineConfig(cat_max_ratio=0)
    assert TrainPipelineConfig().crop_size == (512, 512)
    image, mask = scene()
    still = TrainTransform(TrainPipelineConfig(hue_delta=0, saturation_range=(1.0, 1.0), **SMALL))
    for seed in range(20):
        still(image, mask, np.random.default_rng(seed))


# ---------------------------------------------------------------- val pipeline


def test_val_resizes_image_keeping_ratio_and_keeps_mask_at_original_size():
    image = np.full((300, 400, 3), (10, 128, 250), np.uint8)
    mask = np.random.default_rng(0).integers(0, 150, (300, 400)).astype(np.uint8)
    out_img, out_mask = ValTransform(ValPipelineConfig())(image, mask)
    assert rescaled_size(300, 400, (2048, 512)) == (512, 683)
    assert out_img.shape == (3, 512, 683) and out_img.dtype == torch.float32
    np.testing.assert_allclose(out_img[:, 100, 100].numpy(), (np.array([10, 128, 250]) - MEAN) / STD, atol=1e-5)
    assert out_mask.dtype == torch.int64
    np.testing.assert_array_equal(out_mask.numpy(), mask)
    # a portrait image is bounded by the long edge as well: 2048 / 4000 < 512 / 600
    assert rescaled_size(4000, 600, (2048, 512)) == (2048, 307)
    image_only, none = ValTransform(ValPipelineConfig())(image)
    assert none is None and image_only.shape == (3, 512, 683)


# ---------------------------------------------------------------- labels


def test_reduce_zero_label_is_exactly_mmsegs():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = values.copy()
    expected[expected == 0] = 255
    expected = expected - 1
    expected[expected == 254] = 255
    mapper = LabelMapper(num_classes=254, reduce_zero_label=True)
    out = mapper(values)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(values.ravel(), np.arange(256))  # input untouched
    # wider integer masks take another path and give the same labels
    np.testing.assert_array_equal(mapper(values.astype(np.uint16)), expected)
    np.testing.assert_array_equal(mapper(values.astype(np.int64)), expected)


def test_label_map_applies_once_and_after_reduce_zero_label():
    mask = np.array([[0, 1, 2, 3]], np.uint8)
    np.testing.assert_array_equal(LabelMapper(4, label_map={1: 2, 2: 3})(mask), [[0, 2, 3, 3]])
    mask = np.array([[0, 1, 2, 3, 255]], np.uint8)
    # reduce: [255, 0, 1, 2, 255]; then {0: 5, 1: 0}
    mapper = LabelMapper(6, reduce_zero_label=True, label_map={0: 5, 1: 0})
    np.testing.assert_array_equal(mapper(mask), [[255, 5, 0, 2, 255]])
    np.testing.assert_array_equal(mapper(mask), [[255, 5, 0, 2, 255]])  # stateless per call


def test_out_of_range_error_names_example_values_and_fix():
    mask = np.array([[0, 1, 151, 200], [200, 255, 3, 4]], np.uint8)
    with pytest.raises(UserError) as err:
        LabelMapper(150, reduce_zero_label=True)(mask, example_id="ADE_train_00000042")
    message = str(err.value)
    assert "ADE_train_00000042" in message and "[151, 200]" in message and "3 annotation pixels" in message
    assert "data.out_of_range: ignore" in message and "num_classes" in message
    with pytest.raises(UserError, match="out_of_range is 'ignor'.*did you mean 'ignore'"):
        LabelMapper(150, out_of_range="ignor")


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_out_of_range_ignore_maps_to_ignore_index_and_counts(dtype):
    mask = np.array([[0, 1, 9, 12], [12, 255, 3, 4]], dtype)
    mapper = LabelMapper(5, out_of_range="ignore")
    out = mapper(mask, "x")
    np.testing.assert_array_equal(out, [[0, 1, 255, 255], [255, 255, 3, 4]])
    assert mapper.last_out_of_range == 3
    mapper(mask)
    mapper(np.zeros((2, 2), dtype))
    assert (mapper.out_of_range_pixels, mapper.out_of_range_examples, mapper.last_out_of_range) == (6, 2, 0)


def test_label_values_beyond_uint8_are_kept_in_int64():
    mask = np.array([[0, 300], [299, 1000]], np.uint16)
    out = LabelMapper(1000, ignore_index=1000)(mask)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, mask)


# ---------------------------------------------------------------- decoding


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_from_bytes_dict_path_pil_and_array(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :, 0] = 200  # red
    ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1])
    decoded = decode_image(jpeg.tobytes())
    assert decoded.shape == (6, 8, 3) and decoded.dtype == np.uint8
    assert decoded[..., 0].mean() > 180 and decoded[..., 2].mean() < 20
    path = tmp_path / "a.png"
    path.write_bytes(_png(rgb))
    np.testing.assert_array_equal(decode_image({"bytes": None, "path": str(path)}), rgb)
    np.testing.assert_array_equal(decode_image({"bytes": _png(rgb), "path": None}), rgb)
    np.testing.assert_array_equal(decode_image(Image.fromarray(rgb)), rgb)
    assert decode_image(Image.fromarray(rgb[:, :, 0])).shape == (6, 8, 3)
    assert decode_image(rgb[:, :, 0]).shape == (6, 8, 3)
    with pytest.raises(UserError, match="img_9.*could not be decoded"):
        decode_image(b"not an image", example_id="img_9")


def test_decode_mask_keeps_indices_of_grey_palette_and_16_bit_pngs():
    labels = np.arange(48, dtype=np.uint8).reshape(6, 8)
    np.testing.assert_array_equal(decode_mask(_png(labels)), labels)
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_mask(buf.getvalue()), np.asarray(palette))
    wide = (labels.astype(np.uint16) * 300)
    ok, png16 = cv2.imencode(".png", wide)
    out = decode_mask(png16.tobytes())
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, wide)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(labels)), labels)


def test_rgb_annotation_is_rejected_naming_the_example():
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3)).astype(np.uint8)
    with pytest.raises(UserError, match=r"ADE_val_17.*3 channels.*single-channel"):
        decode_mask(_png(rgb), example_id="ADE_val_17")
    grey_as_rgb = np.repeat(rgb[:, :, :1], 3, axis=2)
    with pytest.raises(UserError, match="ADE_val_18.*greyscale"):
        decode_mask(Image.fromarray(grey_as_rgb), example_id="ADE_val_18")
    with pytest.raises(UserError, match="m1.*float"):
        decode_mask(np.zeros((4, 4), np.float32), example_id="m1")
