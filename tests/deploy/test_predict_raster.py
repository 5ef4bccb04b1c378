"""``hooktrain predict`` on rasters: GeoTIFF in, georeferenced label GeoTIFF out, tile by tile."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import QUICKSTART, assert_refused, cli, export_untrained

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

from hooktrain.deploy.predict import TILE_ABOVE, _is_tiled  # noqa: E402
from hooktrain.deploy.segmenter import Segmenter  # noqa: E402
from hooktrain.deploy.tiled import ArraySource  # noqa: E402
from hooktrain.models.inference import slide_windows  # noqa: E402

TILES = ["--crop-size", "64", "64", "--stride", "48", "48"]
CRS, TRANSFORM = "EPSG:32633", Affine(10, 0, 500000, 0, -10, 4500000)  # 10 m pixels, UTM 33N


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raster_model")
    return export_untrained(QUICKSTART, root, "data.val.pipeline.scale=[64,32]", in_process=True)


def pattern(height: int, width: int, bands: int = 3) -> np.ndarray:
    """``bands x H x W`` uint8 stripes and blobs (a model sees structure, the file compresses)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(yy / 9.0) * np.cos(xx / 13.0) * 100 + 128).astype(np.uint8)
    return np.stack([base, 255 - base, (xx * 3 + yy) % 251][:bands]).astype(np.uint8)


def write_geotiff(path: Path, pixels: np.ndarray, **profile) -> Path:
    bands, height, width = pixels.shape
    options = dict(driver="GTiff", height=height, width=width, count=bands, dtype=str(pixels.dtype), crs=CRS,
                   transform=TRANSFORM, tiled=True, blockxsize=64, blockysize=64, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **{**options, **profile}) as dst:
        dst.write(pixels)
    return path


def tiled_reference(model: Path, image: np.ndarray, valid=None, **tiles) -> tuple[np.ndarray, np.ndarray]:
    """The labels and uint8 probabilities of ``Segmenter.tiled`` on the image in memory."""
    segmenter = Segmenter.load(model, device="cpu", batch_size=2)
    predictor = segmenter.tiled(ArraySource(image, valid), crop_size=(64, 64), stride=(48, 48),
                                probabilities="uint8", **tiles)  # fmt: skip
    with torch.no_grad():
        rows = list(predictor.rows())
    labels = np.concatenate([block.labels for block in rows])
    probs = np.concatenate([block.probabilities for block in rows], 1)
    return labels, probs


def test_a_geotiff_is_predicted_into_a_georeferenced_label_geotiff(tmp_path, model, capsys):
    pixels = pattern(300, 410)
    pixels[:, :, :70] = 0  # a nodata collar, wider than a tile
    pixels[:, 250:, 380:] = 0
    source = write_geotiff(tmp_path / "scene.tif", pixels, nodata=0)
    out = tmp_path / "out"
    result = cli(capsys, "predict", model, source, "--out", out, *TILES, "--blend", "hann", "--probabilities",
                 "--batch-size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 label GeoTIFFs" in result.stdout
    tiles = len(slide_windows(300, 410, (64, 64), (48, 48)))
    assert f"{tiles}/{tiles}" in result.stderr  # the progress bar counted every tile
    assert sorted(p.name for p in out.iterdir()) == ["scene_label.tif", "scene_probs.tif"]
    valid = (pixels != 0).any(0)
    with rasterio.open(out / "scene_label.tif") as labels_tif:
        assert (labels_tif.crs.to_string(), labels_tif.transform) == (CRS, TRANSFORM)
        assert labels_tif.block_shapes == [(256, 256)] and labels_tif.compression.name == "deflate"
        assert labels_tif.nodata == 255 and labels_tif.colormap(1)[1][:3] == (230, 25, 75)
        labels = labels_tif.read(1)
    assert (labels[~valid] == 255).all() and labels[valid].max() < 5
    image = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    expected_labels, expected_probs = tiled_reference(model, image, valid, blend="hann")
    assert np.array_equal(labels[valid], expected_labels[valid])
    with rasterio.open(out / "scene_probs.tif") as probs_tif:
        assert probs_tif.count == 5 and probs_tif.crs.to_string() == CRS and probs_tif.transform == TRANSFORM
        probs = probs_tif.read()
        assert np.array_equal(probs_tif.dataset_mask() > 0, valid)
    assert np.array_equal(probs[:, valid], expected_probs[:, valid])
    assert np.abs(probs[:, valid].astype(int).sum(0) - 255).max() <= 3  # rounded probabilities sum to 1


def test_large_pngs_are_tiled_and_an_alpha_band_is_the_nodata_mask(tmp_path, model, capsys):
    huge = tmp_path / "huge.png"
    cv2.imwrite(str(huge), np.zeros((4097, 4096), np.uint8))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((64, 64), np.uint8))
    assert 4097 * 4096 > TILE_ABOVE and _is_tiled(huge, None) and not _is_tiled(small, None)
    assert _is_tiled(small, True) and not _is_tiled(huge, False)

    rgb = pattern(150, 200).transpose(1, 2, 0)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[100:, :90] = 0
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), cv2.cvtColor(np.dstack([rgb, alpha]), cv2.COLOR_RGBA2BGRA))
    out = tmp_path / "out"
    result = cli(capsys, "predict", model, photo, "--out", out, "--tiled", *TILES, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tile/s" not in result.stderr
    with rasterio.open(out / "photo_label.tif") as labels_tif:
        assert labels_tif.crs is None
        labels = labels_tif.read(1)
    valid = alpha > 0
    assert (labels[~valid] == 255).all()
    assert np.array_equal(labels[valid], tiled_reference(model, np.ascontiguousarray(rgb), valid)[0][valid])


def test_bad_rasters_are_refused_in_one_line_and_leave_no_output(tmp_path, model, capsys):
    out = tmp_path / "out"
    two_bands = write_geotiff(tmp_path / "two.tif", pattern(80, 80, 2))
    assert_refused(cli(capsys, "predict", model, two_bands, "--out", out), "has 2 bands", "takes 3")
    floats = write_geotiff(tmp_path / "floats.tif", pattern(80, 80).astype(np.float32) / 255)
    assert_refused(cli(capsys, "predict", model, floats, "--out", out), "float32", "uint8 or uint16")
    # A file cut short: the first rows read, then the damage; the partial output is removed.
    whole = write_geotiff(tmp_path / "whole.tif", np.random.default_rng(0).integers(0, 255, (3, 400, 300), np.uint8))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    result = cli(capsys, "predict", model, cut, "--out", out, *TILES, "--no-progress")
    assert_refused(result, "cut.tif", "damaged or truncated")
    assert not any(out.iterdir())
