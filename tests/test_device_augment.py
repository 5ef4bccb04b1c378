"""``data.train.gpu_augment``: PhotoMetricDistortion and normalisation batched on the device,
against the OpenCV path (hooktrain.data.transforms, bit-exact with MMSegmentation 1.2.2).

Measured with opencv-python 5.0.0 on x86-64 with AVX2 (AMD EPYC): the device function is
bit-exact with the OpenCV path, for every 8-bit colour (RGB -> HSV), every 8-bit HSV value
(HSV -> RGB, in whole vector steps and in row tails), fixed parameters on whole crops, 60
TrainTransform draws and the stream's batches (max difference 0, in normalised units and in
uint8 steps). Without the emulation of OpenCV's fused multiply-add, 1,758 of the 35.4 million
HSV -> RGB values were one step off; without the rounded row tails, about 5% of the values in
the tail pixels (a crop ``w`` wide has ``w mod 32`` of them per row). On another host (no AVX2,
ARM) the tests accept one uint8 step; ``MEASURED`` is printed at the end (pytest ``-s``).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ENV, QUICKSTART, run_cli, tiny

from hooktrain.data import build_train_stream, prepare_data
from hooktrain.data import transforms as transforms_module
from hooktrain.data.device_augment import (
    PHOTOMETRIC_FIELDS,
    batch_inputs,
    hsv_to_rgb,
    opencv_rounded_columns,
    photometric_normalise,
    rgb_to_hsv,
)
from hooktrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricDraws,
    TrainPipelineConfig,
    TrainTransform,
    draw_photometric,
)
from hooktrain.errors import UserError
from hooktrain.hooks import Hook
from hooktrain.optim import OptimizerConfig, build_optimizer, use_fused_adamw
from hooktrain.recipe import load_recipe

STD = np.asarray(IMAGENET_STD, np.float32)
ONE_STEP = 1 / float(STD.min()) + 1e-6  # one uint8 step in normalised units, the largest channel's
RESCALE = "data.train.pipeline.ratio_range=[0.5,2.0]"  # the quickstart has none: padded crops, odd widths
MEASURED: dict[str, object] = {}  # printed at the end of the module (pytest -s)
# OpenCV runs its HSV code in 32-pixel AVX2 steps here, which the device function reproduces.
EXACT_HOST = platform.machine() in {"x86_64", "AMD64"} and "*AVX2" in cv2.getCPUFeaturesLine().split()
TOLERANCE = 0 if EXACT_HOST else 1  # uint8 steps


# ---------------------------------------------------------------- helpers


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


def uint8_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference of two normalised [3,H,W] images, in uint8 steps."""
    return int(((a - b).abs() * torch.from_numpy(STD).view(3, 1, 1)).max().round())


def recipe_data(data_root: Path, *extra: str):
    recipe = load_recipe(QUICKSTART, [*tiny(data_root), *extra], "/tmp/unused")
    prepare_data(recipe.data)
    return recipe.data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_augment_shapes") / "shapes"


# ---------------------------------------------------------------- OpenCV's colour conversions


def test_rgb_to_hsv_is_opencvs_for_every_8bit_colour():
    rgb = np.arange(2**24, dtype=np.uint32).view(np.uint8).reshape(4096, 4096, 4)[:, :, :3]
    rgb = np.ascontiguousarray(rgb)
    want = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = rgb_to_hsv(torch.from_numpy(rgb).permute(2, 0, 1))
    got = torch.cat([h, s, v]).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("width", [256, 250])
def test_hsv_to_rgb_is_opencvs_for_every_8bit_hsv(width):
    """Every H 0..179, S, V 0..255, in rows of 256 pixels (whole vector steps) and of 250
    (a 26-pixel tail per row, which OpenCV rounds)."""
    h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 3)
    hsv = np.concatenate([hsv, hsv[: -len(hsv) % width]]).reshape(-1, width, 3)
    want = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    planes = torch.from_numpy(hsv).permute(2, 0, 1).to(torch.int32)
    rounded = opencv_rounded_columns(torch.tensor([width]), width)[0]
    got = hsv_to_rgb(planes[0:1], planes[1:2], planes[2:3], rounded).permute(1, 2, 0).to(torch.uint8).numpy()
    diff = np.abs(got.astype(int) - want)
    MEASURED[f"HSV->RGB, every 8-bit HSV, rows of {width}: values off / largest"] = (int((diff > 0).sum()), diff.max())
    assert diff.max() <= TOLERANCE


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
def test_brightness_and_contrast_equal_the_opencv_path_exactly(name, monkeypatch):
    image = scene(64, 75)
    want = cpu_photometric(image, EXACT[name], monkeypatch)
    assert torch.equal(device_photometric(image, EXACT[name]), want)


@pytest.mark.parametrize("width", [96, 75])
@pytest.mark.parametrize("name", list(HSV))
def test_saturation_and_hue_equal_the_opencv_path(name, width, monkeypatch):
    """Width 96: whole vector steps of 32 pixels (AVX2) per row; width 75: an 11-pixel tail."""
    image = scene(64, width, seed=width)
    want = cpu_photometric(image, HSV[name], monkeypatch)
    got = device_photometric(image, HSV[name])
    steps = uint8_steps(got, want)
    differ = float(((got - want).abs() > 1e-6).float().mean())
    MEASURED[f"{name}, width {width}: max |diff| normalised"] = float((got - want).abs().max())
    MEASURED[f"{name}, width {width}: max uint8 steps / share of values off"] = (steps, round(differ, 5))
    assert steps <= TOLERANCE
    assert float((got - want).abs().max()) <= TOLERANCE * ONE_STEP


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


def test_uint8_crop_draws_what_the_cpu_path_draws_and_gives_its_pixels():
    """The same example and generator: the same crop, flip, photometric draws and mask, and
    after the device function the CPU path's pixels (within TOLERANCE)."""
    cfg = TrainPipelineConfig(scale=(160, 48), crop_size=(48, 48), cat_max_ratio=0.75)
    transform = TrainTransform(cfg)
    image = scene(60, 90, seed=3)
    mask = (scene(60, 90, seed=4)[:, :, 0] // 64).astype(np.uint8)
    worst, padded = 0, 0
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
        worst = max(worst, uint8_steps(got, want))
        padded += (h, w) != (48, 48)
    MEASURED["TrainTransform vs uint8_crop + device, 60 seeds: max uint8 steps"] = worst
    assert worst <= TOLERANCE and padded > 0


def test_stream_batches_with_gpu_augment_are_the_cpu_batches(data_root):
    """The same examples in the same order; the device function on CPU gives the CPU path's
    images (within TOLERANCE); the padding is 0; ``browse`` shows them."""
    cpu_data = recipe_data(data_root, RESCALE)
    gpu_data = recipe_data(data_root, RESCALE, "data.train.gpu_augment=true")
    cpu, gpu = build_train_stream(cpu_data, seed=11), build_train_stream(gpu_data, seed=11)
    worst = padded = 0
    for _ in range(6):
        want, batch = next(cpu), next(gpu)
        assert batch["example_ids"] == want["example_ids"] and batch["mask"].dtype == torch.uint8
        assert torch.equal(batch["mask"].long(), want["mask"])
        assert batch["image"].dtype == torch.uint8 and batch["photometric"].shape == (2, len(PHOTOMETRIC_FIELDS))
        assert batch["image_sizes"].dtype == torch.int64 and batch["image_sizes"].shape == (2, 2)
        image, mask = batch_inputs(batch, "cpu", gpu_data)
        assert image.dtype == torch.float32 and torch.equal(mask, want["mask"])
        worst = max(worst, max(uint8_steps(a, b) for a, b in zip(image, want["image"], strict=True)))
        for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
            padded += (h, w) != (32, 32)
            assert (image[i, :, h:] == 0).all() and (image[i, :, :, w:] == 0).all()
            assert (want["image"][i, :, h:] == 0).all() and (want["image"][i, :, :, w:] == 0).all()
    cpu.close()
    gpu.close()
    MEASURED["stream batches, gpu_augment vs CPU path: max uint8 steps"] = worst
    assert worst <= TOLERANCE and padded > 0

    from hooktrain.analysis.browse import train_samples

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


class InputProbe(Hook):
    """Records the dtype and range of every image batch the model trains on, to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list = []

    def before_run(self, runner) -> None:
        model = runner.unwrapped_model
        forward = model.forward

        def recording(image, *args, **kwargs):
            if model.training:
                self.seen.append([str(image.dtype), float(image.min()), float(image.max())])
            return forward(image, *args, **kwargs)

        model.forward = recording

    def after_run(self, runner) -> None:
        Path(self.path).write_text(json.dumps(self.seen))


def test_quickstart_trains_with_gpu_augment(tmp_path, data_root):
    seen = tmp_path / "inputs.json"
    hooks = (
        f"hooks=[{{type: logger, interval: 2}}, {{type: 'probe_hooks:ProbeHook', prefix: '{tmp_path / 'p'}'}}, "
        f"{{type: 'test_device_augment:InputProbe', path: '{seen}'}}]"
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
