"""Grayscale, multispectral and 16-bit images (``data.in_channels``): decoding without clipping,
transforms exact against a float32 numpy reference, PhotoMetricDistortion's RGB rule, previews,
``data check``, timm's first-layer adaptation of pretrained weights, and real training runs."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import tifffile
import timm
import torch
from conftest import RECIPES, assert_refused, run_cli, tiny

from hooktrain.data.labels import WrongImage, decode_image
from hooktrain.data.shapes import generate_shapes
from hooktrain.data.transforms import TrainTransform, ValTransform
from hooktrain.errors import UserError
from hooktrain.recipe.data import TrainPipelineConfig, ValPipelineConfig
from hooktrain.data.preview import preview

FOUR_BAND = RECIPES / "quickstart_4band.yaml"
RNG = np.random.default_rng(0)
WIDE = RNG.integers(0, 65536, (9, 11, 6), dtype=np.uint16)  # 6 bands of 16 bits


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _tiff(array: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack", **options)
    return buf.getvalue()


# -- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "channels", "expected"),
    [
        (cv2.imencode(".png", cv2.cvtColor(WIDE[..., :3], cv2.COLOR_RGB2BGR))[1].tobytes(), 3, WIDE[..., :3]),
        (cv2.imencode(".png", WIDE[..., 0])[1].tobytes(), 1, WIDE[..., :1]),
        (cv2.imencode(".png", cv2.cvtColor(WIDE[..., :4], cv2.COLOR_RGBA2BGRA))[1].tobytes(), 4, WIDE[..., :4]),
        (_tiff(WIDE, planarconfig="contig"), 6, WIDE),
        (_tiff(np.moveaxis(WIDE, -1, 0), planarconfig="separate"), 6, WIDE),
        (_npy(WIDE), 6, WIDE),
        (_npy(WIDE[..., 0]), 1, WIDE[..., :1]),
        (_npy((WIDE[..., :2] >> 8).astype(np.uint8)), 2, (WIDE[..., :2] >> 8).astype(np.uint8)),
    ],
    ids=["png16-rgb", "png16-grey", "png16-rgba", "tiff-contig", "tiff-planar", "npy", "npy-grey", "npy-uint8"],
)
def test_images_decode_to_hwc_without_clipping(encoded, channels, expected):
    image = decode_image(encoded, "x", channels)
    assert image.dtype == expected.dtype and image.shape == expected.shape
    np.testing.assert_array_equal(image, expected)


def test_npy_files_decode_from_their_path_and_grey_png_gives_one_channel(tmp_path):
    (tmp_path / "a.npy").write_bytes(_npy(WIDE))
    np.testing.assert_array_equal(decode_image({"bytes": None, "path": str(tmp_path / "a.npy")}, "a", 6), WIDE)
    grey = (WIDE[..., 0] >> 8).astype(np.uint8)
    image = decode_image(cv2.imencode(".png", grey)[1].tobytes(), "g", 1)
    assert image.shape == (9, 11, 1) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], grey)


def test_eight_bit_rgb_keeps_opencvs_rgb_decoding():
    rgb = (WIDE[..., :3] >> 8).astype(np.uint8)
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decode_image(jpeg, "j"), expected)
    grey_png = cv2.imencode(".png", rgb[..., 0])[1].tobytes()
    assert decode_image(grey_png, "g").shape == (9, 11, 3)  # in_channels 3: grey repeated, as before


def test_channel_mismatch_and_other_dtypes_are_one_line_errors():
    with pytest.raises(WrongImage, match=r"'cat.npy'.* 6 channels \(uint16\) but data.in_channels is 4; "
                                         r"set data.in_channels: 6"):  # fmt: skip
        decode_image(_npy(WIDE), "cat.npy", 4)
    with pytest.raises(WrongImage, match="dtype float32; images must be uint8 or uint16"):
        decode_image(_npy(WIDE.astype(np.float32)), "f.npy", 6)


# -- transforms ----------------------------------------------------------------------------


def _reference(image: np.ndarray, size: tuple[int, int], mean, std) -> np.ndarray:
    """Resize in float32 (uint16) or uint8, then ``(x - mean) / std`` in float32: [C, h, w]."""
    source = image.astype(np.float32) if image.dtype == np.uint16 else image
    resized = cv2.resize(source, size[::-1], interpolation=cv2.INTER_LINEAR).reshape(*size, image.shape[2])
    out = (resized.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize(("channels", "dtype"), [(1, np.uint16), (4, np.uint16), (1, np.uint8), (4, np.uint8)])
def test_train_and_val_transforms_match_a_float32_reference(channels, dtype):
    top = 65535 if dtype == np.uint16 else 255
    image = RNG.integers(0, top + 1, (20, 30, channels)).astype(dtype)
    image[0, 0] = top  # neighbouring 16-bit values must stay apart
    image[0, 1] = top - 1
    mask = RNG.integers(0, 3, (20, 30), dtype=np.uint8)
    mean, std = [top * 0.4 + c for c in range(channels)], [top * 0.2 + c for c in range(channels)]

    val = ValTransform(ValPipelineConfig(scale=(45, 30)), mean, std, in_channels=channels)
    out, _ = val(image, mask)
    np.testing.assert_array_equal(out.numpy(), _reference(image, (30, 45), mean, std))

    cfg = TrainPipelineConfig(scale=(45, 30), ratio_range=(1.0, 1.0), crop_size=(30, 45), cat_max_ratio=1.0,
                              flip_prob=1.0, photometric=False)  # fmt: skip
    out, out_mask = TrainTransform(cfg, mean, std, in_channels=channels)(image, mask, np.random.default_rng(0))
    assert out.shape == (channels, 30, 45) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), _reference(image, (30, 45), mean, std)[:, :, ::-1])
    if dtype == np.uint16:
        assert out[0, 0, -1] != out[0, 0, -2]  # 65535 and 65534 told apart after resizing


def test_photometric_touches_the_first_three_bands_only():
    image = RNG.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    mask = RNG.integers(0, 3, (40, 48), dtype=np.uint8)
    mean, std = [120.0, 110.0, 100.0, 90.0], [60.0, 55.0, 50.0, 45.0]
    cfg = TrainPipelineConfig(scale=(48, 40), ratio_range=(0.8, 1.2), crop_size=(32, 32))
    for seed in range(6):  # every photometric step is drawn in some of these
        four, _ = TrainTransform(cfg, mean, std)(image, mask, np.random.default_rng(seed))
        rgb, _ = TrainTransform(cfg, mean[:3], std[:3])(image[..., :3].copy(), mask, np.random.default_rng(seed))
        plain_cfg = cfg.model_copy(update={"photometric": False})
        plain, _ = TrainTransform(plain_cfg, mean, std)(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(four[:3].numpy(), rgb.numpy())  # the mmseg-exact RGB path
        np.testing.assert_array_equal(four[3].numpy(), plain[3].numpy())  # band 4 untouched


def test_photometric_is_refused_for_grey_and_16_bit_images(tmp_path):
    with pytest.raises(UserError, match="photometric: .* set photometric: false"):
        TrainTransform(TrainPipelineConfig(), [100.0], [50.0])
    transform = TrainTransform(TrainPipelineConfig(scale=(32, 32), crop_size=(16, 16)), [1.0] * 4, [1.0] * 4)
    with pytest.raises(UserError, match="uint16, not 8-bit; set photometric: false"):
        transform(WIDE[..., :4], np.zeros((9, 11), np.uint8), np.random.default_rng(0))
    result = run_cli("config", str(FOUR_BAND), "--cfg-options", "data.in_channels=1", "data.mean=[90]",
                     "data.std=[60]", "data.train.source.bands=1", "data.val.source.bands=1",
                     "data.train.pipeline.photometric=true")  # fmt: skip
    assert_refused(result, "data.train.pipeline.photometric", "in_channels is 1; set photometric: false")


def test_previews_show_grey_the_first_three_bands_and_stretch_16_bits():
    grey = preview(np.full((1, 2, 2), 1.0, np.float32), [100.0], [10.0])
    assert grey.shape == (2, 2, 3) and (grey == 110).all()
    four = preview(np.zeros((4, 2, 2), np.float32), [10.0, 20.0, 30.0, 40.0], [1.0] * 4)
    assert four.shape == (2, 2, 3) and four[0, 0].tolist() == [10, 20, 30]
    wide = preview(np.array([[[0.0, 1.0]]], np.float32), [1000.0], [60000.0])
    assert wide[0, 0, 0] == 0 and wide[0, 1, 0] == 255


# -- data check ----------------------------------------------------------------------------


def test_data_check_reports_channels_and_dtype_and_the_mismatch(tmp_path, capsys):
    from hooktrain.tools.check import check_data

    root = generate_shapes(tmp_path / "wide", num_train=4, num_val=2, image_size=32, train_shards=1, val_shards=1,
                           bands=4, bit_depth=16)  # fmt: skip
    options = [f"data.train.source.root={root}", f"data.val.source.root={root}", "data.train.source.bit_depth=16",
               "data.val.source.bit_depth=16", "data.mean=[3e4,3e4,3e4,3e4]", "data.std=[2e4,2e4,2e4,2e4]",
               *(f"data.{s}.source.{k}={v}" for s in ("train", "val") for k, v in
                 (("num_train", 4), ("num_val", 2), ("image_size", 32), ("train_shards", 1),
                  ("val_shards", 1)))]  # fmt: skip
    check_data(FOUR_BAND, options, limit=4)
    assert "decoded as    4 channels, uint16: 4" in capsys.readouterr().out

    parquet = tmp_path / "wide_as_rgb.yaml"
    parquet.write_text(
        f"_base_: [{RECIPES / 'quickstart.yaml'}]\n"
        f"data:\n  train:\n    source: {{_delete_: true, type: parquet, data_files: '{root}/data/train-*.parquet'}}\n"
        "    pipeline: {photometric: false}\n"
    )
    with pytest.raises(UserError, match=r"4 images do not fit data.in_channels=3 .*set data.in_channels: 4"):
        check_data(parquet, ["data.in_channels=3"], limit=4)
    assert "PROBLEM  4 images decode but do not fit the recipe" in capsys.readouterr().out


# -- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mit_b0"])
def test_pretrained_first_layer_is_adapted_with_timm(tmp_path, name):
    """resnet18 loads through timm's own pretrained path, mit_b0 through hooktrain's conversion."""
    from safetensors.torch import save_file

    from hooktrain.models.encoder import build_encoder
    from hooktrain.models.mit import create_mit
    from hooktrain.recipe.model import EncoderConfig

    model = timm.create_model(name) if name == "resnet18" else create_mit(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    first = "conv1.weight" if name == "resnet18" else "patch_embed.proj.weight"
    for channels in (1, 4):
        cfg = EncoderConfig(name=name, pretrained_path=str(tmp_path / "weights.safetensors"))
        encoder = build_encoder(cfg, in_channels=channels)
        expected = timm.models.adapt_input_conv(channels, state[first])
        assert torch.equal(encoder.state_dict()[first], expected)
        assert len(encoder(torch.zeros(1, channels, 64, 64))) == 4


# -- training ------------------------------------------------------------------------------


@pytest.mark.parametrize(("bands", "bit_depth"), [(4, 8), (1, 16)], ids=["4-band", "grey-16-bit"])
def test_training_runs_on_generated_multichannel_data(tmp_path_factory, bands, bit_depth):
    top = 255 if bit_depth == 8 else 65535
    root = tmp_path_factory.mktemp(f"shapes_{bands}_{bit_depth}") / "shapes"
    work = root.parent / "run"
    result = run_cli(
        str(FOUR_BAND), "--work-dir", str(work), "--cfg-options", *tiny(root, 2),
        f"data.in_channels={bands}", f"data.mean={[0.45 * top] * bands}", f"data.std={[0.25 * top] * bands}",
        *(f"data.{split}.source.{key}={value}" for split in ("train", "val")
          for key, value in (("bands", bands), ("bit_depth", bit_depth))),
        "hooks=[{type: logger, interval: 1}, {type: checkpoint, interval: 2}"
        + (", {type: eval, interval: 2}]" if bit_depth == 16 else "]"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert losses and all(np.isfinite(losses))
    assert (work / "checkpoints" / "iter_2" / "model.safetensors").is_file()
    if bit_depth == 16:
        assert any(np.isfinite(row.get("val/mIoU", np.nan)) for row in rows)


def test_channel_mismatch_stops_training_with_one_line(tmp_path):
    root = generate_shapes(tmp_path / "grey", num_train=4, num_val=2, image_size=32, train_shards=1, val_shards=1,
                           bands=1)  # fmt: skip
    recipe = tmp_path / "mismatch.yaml"
    recipe.write_text(
        f"_base_: [{FOUR_BAND}]\n"
        f"data:\n  train:\n    source: {{_delete_: true, type: parquet, data_files: '{root}/data/train-*.parquet'}}\n"
        "    num_workers: 0\n    batch_size: 2\n    pipeline: {crop_size: [32, 32], scale: [64, 32]}\n"
        "  val: null\nhooks: [{type: logger, interval: 1}]\ntrain: {max_iters: 2}\n"
    )
    result = run_cli(str(recipe), "--work-dir", str(tmp_path / "run"))
    assert_refused(
        result, ".png (shard 0 row", "1 channel (uint8) but data.in_channels is 4", "set data.in_channels: 1"
    )
