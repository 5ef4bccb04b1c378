"""``hooktrain browse``: the PNGs show the samples exactly as the model sees them.

Two real CLI runs on tiny shapes images (32x32, so every panel is enlarged 8x to 256 px;
val images resized to 64x64 are enlarged 4x): a train run whose crops are certainly padded
(RandomResize makes sides of 16..31 pixels for a 32x32 crop) and a val run with a known
resize. The pictures are read back and compared pixel by pixel with the stream's batches and
with the source images.
"""

from __future__ import annotations

import re
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import QUICKSTART, assert_refused, run_cli, tiny

from hooktrain.recipe.schema import load_recipe
from hooktrain.tools.browse import GAP, IGNORE_CANDIDATES, train_samples

PANEL = 256  # 32 px samples x 8, 64 px val images x 4
WIDTH = 3 * PANEL + 2 * GAP  # image | label | overlay
WHITE = IGNORE_CANDIDATES[0]
# Sides of 16..31 px (int(16 * ratio), ratio in [1, 2)) for a 32x32 crop: bottom/right padding.
PADDED = ["data.train.pipeline.scale=[32,16]", "data.train.pipeline.ratio_range=[1.0,2.0]"]
VAL_64 = ["data.val.pipeline.scale=[128,64]"]  # 32x32 images resized to 64x64, masks stay 32x32
ID = re.compile(r"(train|validation)_\d{6}\.png \(shard \d+ row \d+\)")


@pytest.fixture(scope="module")
def recipe(data_root):
    return load_recipe(QUICKSTART, [*tiny(data_root), *PADDED, *VAL_64])


def browse(data_root: Path, out: Path, *args: str, options: list[str] = ()):
    return run_cli("browse", str(QUICKSTART), "--cfg-options", *tiny(data_root), *options, *args, "--out", str(out))


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def panels(picture: np.ndarray, zoom: int) -> list[np.ndarray]:
    """The picture's image, label and overlay panels at the sample's own size (one pixel of
    each zoom x zoom block), after checking the layout and that every block is uniform."""
    assert picture.shape[1] == WIDTH and picture.shape[0] > PANEL, picture.shape
    strip = picture[:-PANEL]
    assert 20 <= strip.shape[0] <= 60 and (strip > 200).any(), "a caption strip with text on top"
    out = []
    for n in range(3):
        big = picture[-PANEL:, n * (PANEL + GAP) : n * (PANEL + GAP) + PANEL]
        small = big[::zoom, ::zoom]
        assert np.array_equal(np.repeat(np.repeat(small, zoom, 0), zoom, 1), big), "nearest enlargement"
        out.append(small)
    return out


def colours_of(panel: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in np.unique(panel.reshape(-1, 3), axis=0)}


def expected_overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    blend = np.clip(np.rint(image.astype(np.float32) * 0.5 + label.astype(np.float32) * 0.5), 0, 255)
    out = blend.astype(np.uint8)
    ignored = (label == WHITE).all(-1)
    out[ignored] = WHITE
    return out


# -- train ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("browse") / "train" / "nested"  # parents are created
    result = browse(data_root, out, "--num", "3", options=PADDED)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_train_writes_num_samples_as_the_stream_gives_them(train_run, recipe):
    out, result = train_run
    assert result.stdout.strip().splitlines()[-1] == f"wrote 3 samples to {out}"
    assert sorted(p.name for p in out.iterdir()) == ["train_000.png", "train_001.png", "train_002.png"]

    from hooktrain.data import build_train_stream

    data = recipe.data.model_copy(update={"train": recipe.data.train.model_copy(update={"num_workers": 0})})
    stream = build_train_stream(data, seed=recipe.train.seed)
    batches = [next(stream), next(stream)]  # batch size 2: the third sample is in the second batch
    stream.close()
    images = [img for b in batches for img in b["image"]][:3]
    masks = [m.numpy() for b in batches for m in b["mask"]][:3]
    palette = np.asarray(recipe.data.colours, np.uint8)
    classes = set()
    for n, (tensor, mask) in enumerate(zip(images, masks, strict=True)):
        image, label, overlay = panels(read_rgb(out / f"train_{n:03d}.png"), zoom=8)
        # de-normalised: exactly the batch's tensor, real 0..255 pixel values
        mean, std = np.asarray(recipe.data.mean, np.float32), np.asarray(recipe.data.std, np.float32)
        want = np.clip(np.rint(tensor.numpy().transpose(1, 2, 0) * std + mean), 0, 255).astype(np.uint8)
        assert np.array_equal(image, want)
        assert int(image.max()) - int(image.min()) > 50
        # padding (bottom/right, mask 255): the mean colour in the image, white in the label
        padding = mask == 255
        assert padding[-1].all() and padding[:, -1].all() and not padding.all()
        assert (image[padding] == np.rint(recipe.data.mean).astype(np.uint8)).all()
        assert (label[padding] == WHITE).all() and (overlay[padding] == WHITE).all()
        # every labelled pixel in its class's palette colour, blended into the overlay
        assert np.array_equal(label[~padding], palette[mask[~padding]])
        assert np.array_equal(overlay, expected_overlay(image, label))
        classes |= set(np.unique(mask[~padding]).tolist())
    assert len(classes) >= 2  # cat_max_ratio keeps shapes in the crops, not only background


def test_train_batches_name_their_examples_and_captions_show_them(recipe):
    from hooktrain.data import build_train_stream

    data = recipe.data.model_copy(update={"train": recipe.data.train.model_copy(update={"num_workers": 0})})
    stream = build_train_stream(data, seed=recipe.train.seed)
    batch = next(stream)
    stream.close()
    assert set(batch) == {"image", "mask", "example_ids", "passes"}
    assert batch["passes"] == [0, 0] and all(ID.fullmatch(i) for i in batch["example_ids"]), batch["example_ids"]
    samples = train_samples(data, recipe.train.seed)
    captions = [s.caption for s in islice(samples, 2)]
    samples.close()
    for n, (caption, example_id) in enumerate(zip(captions, batch["example_ids"], strict=True)):
        assert caption[0] == f"train sample {n}: pass 0, {example_id}"
        assert caption[1].startswith("32x32; classes: background") and caption[1].endswith("+ ignore")


# -- val -----------------------------------------------------------------------------------


def source_rows(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The shapes split's (RGB image, mask) in shard order, decoded straight from parquet."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((root / "data").glob(f"{split}-*.parquet")):
        table = pq.read_table(path).to_pylist()
        for row in table:
            image = cv2.imdecode(np.frombuffer(row["image"]["bytes"], np.uint8), cv2.IMREAD_COLOR)
            mask = cv2.imdecode(np.frombuffer(row["annotation"]["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
            rows.append((cv2.cvtColor(image, cv2.COLOR_BGR2RGB), mask))
    return rows


def test_val_shows_resized_images_with_masks_resized_nearest(data_root, tmp_path, recipe):
    out = tmp_path / "val"
    result = browse(data_root, out, "--split", "val", "--num", "3", options=VAL_64)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["val_000.png", "val_001.png", "val_002.png"]
    palette = np.asarray(recipe.data.colours, np.uint8)
    for n, (source, mask) in enumerate(source_rows(data_root, "validation")[:3]):  # index n = row n
        assert source.shape == (32, 32, 3)
        image, label, overlay = panels(read_rgb(out / f"val_{n:03d}.png"), zoom=4)
        assert np.array_equal(image, cv2.resize(source, (64, 64), interpolation=cv2.INTER_LINEAR))
        resized = cv2.resize(mask, (64, 64), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(label, palette[resized])
        assert colours_of(label) == {tuple(c) for c in palette[np.unique(mask)].tolist()}
        assert np.array_equal(overlay, expected_overlay(image, label))
        assert len(np.unique(mask)) >= 2


# -- refusals ------------------------------------------------------------------------------


def test_refuses_bad_num_out_file_missing_val_and_bad_source(data_root, tmp_path):
    out = tmp_path / "pngs"
    assert_refused(browse(data_root, out, "--num", "0"), "--num must be at least 1, got 0")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert_refused(browse(data_root, a_file, "--num", "2"), "is a file")
    assert a_file.read_text() == "keep"
    no_val = browse(data_root, out, "--split", "val", options=["data.val=null"])
    assert_refused(no_val, "no data.val section")
    missing = "data.train.source={type: parquet, data_files: /nonexistent/x-*.parquet}"
    assert_refused(browse(data_root, out, options=[missing]), "data.train.source.data_files", "matched no files")
    assert not out.exists()  # nothing is created before the first sample is read
