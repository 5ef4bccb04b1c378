"""``data.train.gpu_augment``: PhotoMetricDistortion and normalisation batched on the device,
against the OpenCV path (hooktrain.data.transforms, bit-exact with MMSegmentation 1.2.2 on the
same machine).

OpenCV picks its HSV kernels by the CPU at run time (steps of 16, 32 or 64 pixels, fused
multiply-add or not, rounded row tails), so the device function cannot equal it bit for bit on
every machine. What holds everywhere, and is asserted here against OpenCV's optimised path and
against its baseline path (``cv2.setUseOptimized(False)``), both on one machine:
    * RGB -> HSV, brightness and contrast: exact;
    * HSV -> RGB, and so a saturation or a hue step alone, for the same input: within 1 uint8
      step (every 8-bit HSV value);
    * whole draws: within ``opencv_step_bound(draws)`` steps (a 1-step difference entering the
      hue step can move OpenCV's 180-level H by one unit). Which pixels differ depends on the
      kernel: OpenCV truncates in its vector loop, as the device function does, and rounds the
      last pixels of each row (fewer than its vector step).
On x86-64 with AVX2 or AVX-512 the device function also equals OpenCV's optimised vector loop
bit for bit in whole vector steps (its fused multiply-add and truncation), which one test checks
where that hardware is. ``MEASURED`` is printed at the end (pytest ``-s``).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ENV, QUICKSTART, run_cli, tiny

from hooktrain.data import build_train_stream, prepare_data
from hooktrain.data import transforms as transforms_module
from hooktrain.data.device_augment import (
    HSV_STEP,
    PHOTOMETRIC_FIELDS,
    hsv_to_rgb,
    opencv_step_bound,
    photometric_normalise,
    rgb_to_hsv,
)
from hooktrain.models.input_stage import InputStage
from hooktrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricDraws,
    TrainPipelineConfig,
    TrainTransform,
    draw_photometric,
)
from hooktrain.engine.optim import OptimizerConfig, build_optimizer, use_fused_adamw
from hooktrain.errors import UserError
from hooktrain.recipe.schema import load_recipe

STD = np.asarray(IMAGENET_STD, np.float32)
RESCALE = "data.train.pipeline.ratio_range=[0.5,2.0]"  # the quickstart has none: padded crops, odd widths
MEASURED: dict[str, object] = {}  # printed at the end of the module (pytest -s)
OPENCV_PATHS = ("optimised", "baseline")  # cv2.setUseOptimized(True / False)
VECTOR_LOOP_HOST = platform.machine() in {"x86_64", "AMD64"} and "*AVX2" in cv2.getCPUFeaturesLine().split()


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A colourful HxWx3 uint8 RGB picture: gradients, noise, saturated and grey patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (h + w)], -1)
    image = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    image[: h // 4, : w // 4] = rng.integers(0, 256, 3, dtype=np.uint8)  # flat colour
    image[-h // 4 :, -w // 4 :] = image[-h // 4 :, -w // 4 :, :1]  # grey (S = 0)
    image[h // 3, :] = 255
    image[h // 2, :] = 0
    return image


def cpu_photometric(image: np.ndarray, draws: PhotometricDraws, monkeypatch) -> torch.Tensor:
    """The OpenCV path's PhotoMetricDistortion + Normalize of ``image`` with fixed draws."""
    h, w = image.shape[:2]
    transform = TrainTransform(TrainPipelineConfig(crop_size=(h, w)))
    monkeypatch.setattr(transforms_module, "draw_photometric", lambda rng, cfg: draws)
    out, pending = transform._photometric(image, None)
    table = transform._norm if pending is None else np.ascontiguousarray(transform._norm[:, pending])
    normalised, _ = transform._normalise_and_pad(out, np.zeros((h, w), np.uint8), table)
    return normalised


def device_photometric(image: np.ndarray, draws: PhotometricDraws) -> torch.Tensor:
    images = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).contiguous()
    params = torch.from_numpy(draws.as_row()).unsqueeze(0)
    return photometric_normalise(images, params, IMAGENET_MEAN, IMAGENET_STD)[0]


def uint8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The differences of two normalised ``[..., 3, H, W]`` images, in uint8 steps (int64)."""
    return ((a - b).abs() * torch.from_numpy(STD).view(3, 1, 1)).round().long()


def recipe_data(data_root: Path, *extra: str):
    recipe = load_recipe(QUICKSTART, [*tiny(data_root), *extra], "/tmp/unused")
    prepare_data(recipe.data)
    return recipe.data


@pytest.fixture(params=OPENCV_PATHS)
def opencv_path(request) -> Iterator[str]:
    """Runs the test on OpenCV's optimised kernels and on its baseline ones (the thread count
    changes nothing here: OpenCV splits the work by rows, and rounds within a row)."""
    optimised = cv2.useOptimized()
    cv2.setUseOptimized(request.param == "optimised")
    try:
        yield request.param
    finally:
        cv2.setUseOptimized(optimised)


# ---------------------------------------------------------------- OpenCV's colour conversions


def test_rgb_to_hsv_is_opencvs_for_every_8bit_colour(opencv_path):
    rgb = np.arange(2**24, dtype=np.uint32).view(np.uint8).reshape(4096, 4096, 4)[:, :, :3]
    rgb = np.ascontiguousarray(rgb)
    want = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = rgb_to_hsv(torch.from_numpy(rgb).permute(2, 0, 1))
    got = torch.cat([h, s, v]).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def every_hsv_value(width: int) -> np.ndarray:
    """Every H 0..179, S, V 0..255 as uint8 rows of ``width`` pixels (the last row completed)."""
    h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 3)
    return np.concatenate([hsv, hsv[: -len(hsv) % width]]).reshape(-1, width, 3)


def device_hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    planes = torch.from_numpy(hsv).permute(2, 0, 1).to(torch.int32)
    return hsv_to_rgb(planes[0:1], planes[1:2], planes[2:3]).permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("width", [256, 250])
def test_hsv_to_rgb_is_within_one_step_of_opencv_for_every_8bit_hsv(width, opencv_path):
    """Rows of 256 pixels (whole vector steps for every SIMD width) and of 250 (row tails,
    which OpenCV converts one by one and rounds)."""
    hsv = every_hsv_value(width)
    diff = np.abs(device_hsv_to_rgb(hsv).astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    MEASURED[f"HSV->RGB, every 8-bit HSV, rows of {width}, {opencv_path}: values off / largest"] = (
        int((diff > 0).sum()), int(diff.max()))  # fmt: skip
    assert diff.max() <= HSV_STEP


@pytest.mark.skipif(not VECTOR_LOOP_HOST, reason="needs OpenCV's x86-64 AVX2/AVX-512 HSV kernels")
def test_hsv_to_rgb_equals_opencvs_vector_loop_bit_for_bit():
    """Hardware-dependent: where OpenCV runs its x86-64 AVX2 or AVX-512 code, whole vector
    steps (rows of 256 pixels) are its float32 formula with a fused multiply-add, truncated."""
    hsv = every_hsv_value(256)
    optimised = cv2.useOptimized()
    cv2.setUseOptimized(True)
    try:
        assert np.array_equal(device_hsv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    finally:
        cv2.setUseOptimized(optimised)


# ---------------------------------------------------------------- (a) fixed parameters


EXACT = {
    "brightness +31.7": PhotometricDraws(31.7, False, None, None, None),
    "brightness -20.2": PhotometricDraws(-20.2, False, None, None, None),
    "contrast first 1.43": PhotometricDraws(None, True, 1.43, None, None),
    "contrast last 0.61": PhotometricDraws(None, False, 0.61, None, None),
    "brightness + contrast last": PhotometricDraws(12.5, False, 1.37, None, None),
    "none": PhotometricDraws(None, False, None, None, None),
}
HSV = {
    "saturation 0.5": PhotometricDraws(None, False, None, 0.5, None),
    "saturation 1.0": PhotometricDraws(None, True, None, 1.0, None),
    "saturation 1.47": PhotometricDraws(None, False, None, 1.47, None),
    "hue -18": PhotometricDraws(None, False, None, None, -18),
    "hue +17": PhotometricDraws(None, False, None, None, 17),
    "hue 0": PhotometricDraws(None, False, None, None, 0),
    "all, contrast first": PhotometricDraws(-9.3, True, 1.21, 0.77, 5),
    "all, contrast last": PhotometricDraws(25.0, False, 0.55, 1.33, -11),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_brightness_and_contrast_equal_the_opencv_path_exactly(name, monkeypatch, opencv_path):
    image = scene(64, 75)
    want = cpu_photometric(image, EXACT[name], monkeypatch)
    assert torch.equal(device_photometric(image, EXACT[name]), want)


@pytest.mark.parametrize("width", [96, 75])
@pytest.mark.parametrize("name", list(HSV))
def test_saturation_and_hue_stay_within_the_bound_of_the_opencv_path(name, width, monkeypatch, opencv_path):
    """Width 96: whole vector steps for 16- and 32-pixel kernels, a 32-pixel tail for 64; width
    75: a tail for every kernel."""
    draws = HSV[name]
    image = scene(64, width, seed=width)
    steps = uint8_steps(device_photometric(image, draws), cpu_photometric(image, draws, monkeypatch))
    bound = opencv_step_bound(draws.as_row())
    MEASURED[f"{name}, width {width}, {opencv_path}: max uint8 steps / mean / bound"] = (
        int(steps.max()), round(float(steps.float().mean()), 4), bound)  # fmt: skip
    assert int(steps.max()) <= bound


# ---------------------------------------------------------------- (b) the same draws


def mmseg_draws(rng: np.random.Generator, cfg: TrainPipelineConfig) -> list[float]:
    """MMSegmentation 1.2.2's PhotoMetricDistortion.transform, its draws only, written out
    literally (np.random -> rng), as a row of PHOTOMETRIC_FIELDS."""
    row = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    if rng.integers(2):  # brightness
        row[0:2] = [1.0, rng.uniform(-cfg.brightness_delta, cfg.brightness_delta)]
    mode = rng.integers(2)
    row[2] = float(mode == 1)
    if mode == 1 and rng.integers(2):  # contrast
        row[3:5] = [1.0, rng.uniform(*cfg.contrast_range)]
    if rng.integers(2):  # saturation
        row[5:7] = [1.0, rng.uniform(*cfg.saturation_range)]
    if rng.integers(2):  # hue
        row[7:9] = [1.0, rng.integers(-cfg.hue_delta, cfg.hue_delta)]
    if mode == 0 and rng.integers(2):  # contrast
        row[3:5] = [1.0, rng.uniform(*cfg.contrast_range)]
    return row


def test_the_draws_are_mmsegs_in_mmsegs_order():
    cfg = TrainPipelineConfig()
    rows = []
    for seed in range(400):
        ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
        row = draw_photometric(ours, cfg).as_row()
        assert np.array_equal(row, np.asarray(mmseg_draws(theirs, cfg), np.float32)), seed
        assert ours.bit_generator.state == theirs.bit_generator.state
        rows.append(row)
    rows = np.stack(rows)
    assert rows.shape[1] == len(PHOTOMETRIC_FIELDS)
    for flag in (0, 2, 3, 5, 7):  # each step (and the mode) about half the time
        assert 0.4 < rows[:, flag].mean() < 0.6, PHOTOMETRIC_FIELDS[flag]
    assert set(rows[rows[:, 7] == 1, 8]) <= set(range(-18, 18))


def test_uint8_crop_draws_what_the_cpu_path_draws_and_gives_its_pixels(opencv_path):
    """The same example and generator: the same crop, flip, photometric draws and mask, and
    after the device function the CPU path's pixels (within each draw's bound)."""
    cfg = TrainPipelineConfig(scale=(160, 48), crop_size=(48, 48), cat_max_ratio=0.75)
    transform = TrainTransform(cfg)
    image = scene(60, 90, seed=3)
    mask = (scene(60, 90, seed=4)[:, :, 0] // 64).astype(np.uint8)
    over, padded, steps = [], 0, []
    for seed in range(60):
        cpu_rng, gpu_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        want, want_mask = transform(image, mask, cpu_rng)
        crop, crop_mask, row, (h, w) = transform.uint8_crop(image, mask, gpu_rng)
        assert cpu_rng.bit_generator.state == gpu_rng.bit_generator.state, seed
        assert crop.dtype == torch.uint8 and crop.shape == (3, 48, 48)
        assert torch.equal(crop_mask, want_mask)
        assert (crop[:, h:] == 0).all() and (crop[:, :, w:] == 0).all()
        got = photometric_normalise(crop[None], row[None], IMAGENET_MEAN, IMAGENET_STD, torch.tensor([[h, w]]))[0]
        assert (got[:, h:] == 0).all() and (got[:, :, w:] == 0).all()
        steps.append(uint8_steps(got, want))
        if int(steps[-1].max()) > opencv_step_bound(row):
            over.append((seed, int(steps[-1].max()), opencv_step_bound(row)))
        padded += (h, w) != (48, 48)
    steps = torch.stack(steps).float()
    MEASURED[f"TrainTransform vs uint8_crop + device, 60 seeds, {opencv_path}: max / mean uint8 steps"] = (
        int(steps.max()), round(float(steps.mean()), 4))  # fmt: skip
    assert not over, f"(seed, steps, bound): {over}"
    assert padded > 0


def test_stream_batches_with_gpu_augment_are_the_cpu_batches(data_root):
    """The same examples in the same order; the device function on CPU gives the CPU path's
    images (within each draw's bound); the padding is 0; ``browse`` shows them."""
    cpu_data = recipe_data(data_root, RESCALE)
    gpu_data = recipe_data(data_root, RESCALE, "data.train.gpu_augment=true")
    cpu, gpu = build_train_stream(cpu_data, seed=11), build_train_stream(gpu_data, seed=11)
    over, padded, steps = [], 0, []
    for _ in range(6):
        want, batch = next(cpu), next(gpu)
        assert batch["example_ids"] == want["example_ids"] and batch["mask"].dtype == torch.uint8
        assert torch.equal(batch["mask"].long(), want["mask"])
        assert batch["image"].dtype == torch.uint8 and batch["photometric"].shape == (2, len(PHOTOMETRIC_FIELDS))
        assert batch["image_sizes"].dtype == torch.int64 and batch["image_sizes"].shape == (2, 2)
        image, mask = InputStage(gpu_data.mean, gpu_data.std)(batch, "cpu")
        assert image.dtype == torch.float32 and torch.equal(mask, want["mask"])
        for got, expected, row in zip(image, want["image"], batch["photometric"], strict=True):
            steps.append(uint8_steps(got, expected))
            if int(steps[-1].max()) > opencv_step_bound(row):
                over.append((int(steps[-1].max()), opencv_step_bound(row)))
        for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
            padded += (h, w) != (32, 32)
            assert (image[i, :, h:] == 0).all() and (image[i, :, :, w:] == 0).all()
            assert (want["image"][i, :, h:] == 0).all() and (want["image"][i, :, :, w:] == 0).all()
    cpu.close()
    gpu.close()
    steps = torch.stack(steps).float()
    MEASURED["stream batches, gpu_augment vs CPU path: max / mean uint8 steps"] = (
        int(steps.max()), round(float(steps.mean()), 4))  # fmt: skip
    assert not over, f"(steps, bound): {over}"
    assert padded > 0

    from hooktrain.tools.browse import train_samples

    samples = train_samples(gpu_data, 11)
    first = next(samples)
    samples.close()
    assert first.image.dtype == np.uint8 and first.image.shape == (32, 32, 3)


# ---------------------------------------------------------------- (d) resume


def test_gpu_augment_stream_resumes_exactly(data_root):
    data = recipe_data(data_root, RESCALE, "data.train.gpu_augment=true", "data.train.num_workers=1")
    stream = build_train_stream(data, seed=5)
    [next(stream) for _ in range(3)]
    state = stream.state_dict()
    expected = [next(stream) for _ in range(4)]
    stream.close()
    restored = build_train_stream(data, seed=5)
    restored.load_state_dict(state)
    for want in expected:
        got = next(restored)
        assert got["example_ids"] == want["example_ids"]
        for key in ("image", "mask", "photometric", "image_sizes"):
            assert torch.equal(got[key], want[key]), key
    restored.close()


# ---------------------------------------------------------------- refusals


def test_gpu_augment_refuses_16_bit_images_in_one_line(data_root):
    with pytest.raises(UserError, match="gpu_augment") as info:
        load_recipe(
            QUICKSTART,
            [*tiny(data_root), "data.train.gpu_augment=true", "data.train.source.bit_depth=16"],
            "/tmp/unused",
        )
    assert "\n" not in str(info.value)
    transform = TrainTransform(TrainPipelineConfig(crop_size=(32, 32), photometric=False))
    with pytest.raises(UserError, match="data.train.gpu_augment works on 8-bit images.*uint16"):
        transform.uint8_crop(
            np.zeros((40, 40, 3), np.uint16), np.zeros((40, 40), np.uint8), np.random.default_rng(0), example_id="x"
        )


# ---------------------------------------------------------------- (c) a real run


def test_quickstart_trains_with_gpu_augment(tmp_path, data_root):
    seen = tmp_path / "inputs.json"
    hooks = (
        f"hooks=[{{type: logger, interval: 2}}, {{type: 'probe_hooks:ProbeHook', prefix: '{tmp_path / 'p'}'}}, "
        f"{{type: 'probe_hooks:InputProbe', path: '{seen}'}}]"
    )
    result = run_cli(
        str(QUICKSTART), "--work-dir", str(tmp_path / "run"),
        "--cfg-options", *tiny(data_root, 4), "data.train.gpu_augment=true", hooks, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter 4/4" in result.stdout
    losses = json.loads((tmp_path / "p.rank0.json").read_text())["loss"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    inputs = json.loads(seen.read_text())
    assert len(inputs) == 4
    for dtype, low, high in inputs:  # normalised floats (ImageNet mean and std), not 0..255
        assert dtype == "torch.float32" and -2.2 < low < 0 < high < 2.7


# ---------------------------------------------------------------- fused AdamW


def test_adamw_is_fused_exactly_when_the_parameters_train_on_cuda():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    adamw = OptimizerConfig(type="adamw", lr=1e-3)
    assert build_optimizer(model, adamw, device="cuda").defaults["fused"] is True
    assert build_optimizer(model, adamw, device=torch.device("cuda", 0)).defaults["fused"] is True
    for device in ("cpu", torch.device("cpu"), None):  # None: the parameters' own device (CPU)
        optimizer = build_optimizer(model, adamw, device=device)
        assert not optimizer.defaults["fused"], device
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()  # torch's default AdamW on CPU
    assert not build_optimizer(model, OptimizerConfig(type="sgd", lr=0.1), device="cuda").defaults.get("fused")
    meta = torch.nn.Linear(2, 2, device="meta")
    assert not use_fused_adamw([{"params": list(meta.parameters())}])
    assert not use_fused_adamw([{"params": []}])
    if torch.cuda.is_available():
        on_gpu = torch.nn.Linear(2, 2).cuda()
        assert use_fused_adamw([{"params": list(on_gpu.parameters())}])


def teardown_module(module) -> None:
    for key, value in MEASURED.items():
        print(f"measured: {key}: {value}")
