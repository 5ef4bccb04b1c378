"""``hooktrain data check`` and ``hooktrain data convert`` (``--palette``, suffix pairing),
through the real CLI on tiny generated datasets (parquet shards and image folders).

Most tests call the CLI's ``main`` in this process (the same parsing, dispatch and one-line
errors, without paying the imports again); one runs it as a subprocess.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RECIPES, run_cli
from hooktrain.data.parquet import write_image_shard

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]  # none is another's channel reversal


def png(array: np.ndarray) -> bytes:
    """PNG bytes of an index mask (HxW) or of an RGB picture (HxWx3, given as RGB)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    return cv2.imencode(".png", array)[1].tobytes()


def write_split(root: Path, masks: list[np.ndarray], split: str = "train", corrupt=(),
                image_shape=None) -> Path:  # fmt: skip
    """One parquet shard ``root/data/<split>-00000-of-00001.parquet``, one example per mask
    (random images of the mask's size or ``image_shape``; those listed in ``corrupt`` are not
    images)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, mask in enumerate(masks):
        shape = image_shape or mask.shape[:2]
        rgb = np.random.default_rng(i).integers(0, 256, (*shape, 3), dtype=np.uint8)
        image = b"not an image" if i in corrupt else png(rgb)
        images.append({"bytes": image, "path": f"{split}_{i}.png"})
        annotations.append({"bytes": png(mask), "path": f"{split}_{i}.png"})
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    write_image_shard(path, {"image": images, "annotation": annotations}, row_group_size=100)
    return root


def write_recipe(path: Path, root: Path, **data) -> Path:
    """A recipe: the quickstart's FPN model and parquet train/val sources under ``root``."""
    recipe = {
        "_base_": [str(RECIPES / "_base_" / "models" / "fpn_resnet18.yaml")],
        "data": {
            "train": {"source": {"type": "parquet", "data_files": str(root / "data" / "train-*")}},
            "val": {"source": {"type": "parquet", "data_files": str(root / "data" / "val-*")}},
            **data,
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``hooktrain ARGV`` in this process; returns (exit code, stdout, stderr)."""
    from hooktrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space (the report wraps its findings)."""
    return " ".join(text.split())


def one_line_error(err: str) -> str:
    assert err.startswith("hooktrain: error: ") and err.count("\n") == 1, err
    return err


def printed_command(out: str, start: str) -> list[str]:
    """The arguments of the first report line that starts (after indentation) with ``start``."""
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith(start))
    return shlex.split(line)


def class_row(out: str, name: str) -> list[str]:
    """The class table's row of class ``name``: [id, name, pixels, share, images, weight]."""
    return next(line.split() for line in out.splitlines() if f"  {name}  " in line)


def ade_like_masks(n: int = 6) -> list[np.ndarray]:
    """Masks with ADE20K's raw values: 0 (unlabelled) and 1..150, 0 and 150 among them."""
    masks = []
    for i in range(n):
        blocks = np.random.default_rng(i).integers(0, 151, (3, 4), dtype=np.uint8)
        masks.append(cv2.resize(blocks, (16, 12), interpolation=cv2.INTER_NEAREST))
    masks[0][:6, :4] = np.arange(24).reshape(6, 4)  # 0 and ...
    masks[1][:6, :4] = np.arange(127, 151).reshape(6, 4)  # ... 150 appear for sure
    return masks


def test_ade20k_raw_labels_need_reduce_zero_label(tmp_path, capsys):
    """Raw 0..150 with num_classes 150: the diagnosis, exit 2; with reduce_zero_label, exit 0."""
    masks = ade_like_masks()
    recipe = write_recipe(tmp_path / "ade.yaml", write_split(tmp_path, masks), num_classes=150)
    result = run_cli("data", "check", str(recipe))  # the console command, as a user runs it
    assert result.returncode == 2, result.stdout + result.stderr
    assert "0 appears and 150 is the maximum: reduce_zero_label is probably wanted" in (
        one_line_error(result.stderr)
    )
    assert "Raw mask values: 0..150," in result.stdout
    assert "PROBLEM  0 appears and 150 is the maximum" in result.stdout
    assert "Class weights: not computed" in result.stdout  # they would be for the wrong classes

    fix = printed_command(result.stdout, "--cfg-options data.reduce_zero_label")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0 and err == "", err
    assert "Classes (after reduce_zero_label; 150 classes" in out
    assert "Class weights by median frequency balancing" in out
    raw = np.concatenate([m.ravel() for m in masks])
    row = class_row(out, "class_0")  # raw 1 after the shift; raw 0 is ignored
    assert int(row[2].replace(",", "")) == (raw == 1).sum()
    assert int(row[4]) == sum(bool((m == 1).any()) for m in masks)
    ignored = next(line for line in out.splitlines() if "ignored (255)" in line)
    assert f"{(raw == 0).sum():,}" in ignored


def test_cityscapes_label_ids_without_label_map(tmp_path, capsys):
    ids = np.array([0, 7, 8, 11, 21, 23, 26, 33], np.uint8)  # unlabeled, road, ..., bicycle
    masks = [np.repeat(np.roll(ids, i), 4).reshape(4, 8) for i in range(4)]
    recipe = write_recipe(tmp_path / "city.yaml", write_split(tmp_path, masks), num_classes=19)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "values up to 33: Cityscapes labelIds, use the label_map" in one_line_error(err)

    fix = printed_command(out, "--cfg-options 'data.label_map=")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    assert int(class_row(out, "class_0")[2]) == 4 * 4  # road: labelId 7 becomes trainId 0
    assert int(class_row(out, "class_18")[2]) == 4 * 4  # bicycle: 33 becomes 18


def test_binary_0_255_masks_and_zero_based_masks_with_reduce_zero_label(tmp_path, capsys):
    binary = [np.where(np.arange(32).reshape(4, 8) % 3, 0, 255).astype(np.uint8)] * 3
    recipe = write_recipe(tmp_path / "bin.yaml", write_split(tmp_path / "b", binary), num_classes=2)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2 and "255 is the ignore index" in one_line_error(err)
    fix = printed_command(out, "--cfg-options data.num_classes=1 data.mask_scale=255")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    assert "binary: background and foreground" in out
    assert int(class_row(out, "foreground")[2]) == 3 * 11  # 255 is the foreground: 11 pixels per mask

    zero_based = [np.arange(32, dtype=np.uint8).reshape(4, 8) % 5] * 2
    recipe = write_recipe(tmp_path / "z.yaml", write_split(tmp_path / "z", zero_based),
                          num_classes=5, reduce_zero_label=True)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 0, err  # 0 does appear: maybe ADE-like data without its top class ...
    assert "after the shift class 4 never appears" in flat(out)  # ... or VOC-like: a note
    masks = [m + 1 for m in zero_based]  # 1..5 without 0: 0-based would be 0..4
    recipe = write_recipe(tmp_path / "z1.yaml", write_split(tmp_path / "z1", masks),
                          num_classes=6, reduce_zero_label=True)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 0, err  # an ADE20K sample without "other" pixels looks the same: a note
    assert "If the masks are 0-based class indices" in flat(out)


def paint(seed: int, shape=(6, 10)) -> np.ndarray:
    """Random class indices 0..2 in blocks."""
    blocks = np.random.default_rng(seed).integers(0, len(PALETTE), (3, 5), dtype=np.uint8)
    return cv2.resize(blocks, shape[::-1], interpolation=cv2.INTER_NEAREST)


def write_colour_folder(root: Path, indices: list[np.ndarray]) -> tuple[Path, Path]:
    """images/ and masks/ with RGB PNG masks painted with PALETTE."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, index in enumerate(indices):
        rgb = np.random.default_rng(i).integers(0, 256, (*index.shape, 3), dtype=np.uint8)
        (images / f"{i:03d}.png").write_bytes(png(rgb))
        (masks / f"{i:03d}.png").write_bytes(png(np.asarray(PALETTE, np.uint8)[index]))
    return images, masks


def test_rgb_palette_masks_are_diagnosed_and_convert_round_trips(tmp_path, capsys, monkeypatch):
    indices = [paint(i) for i in range(5)]
    images, masks = write_colour_folder(tmp_path / "raw", indices)
    recipe = tmp_path / "colours.yaml"
    recipe.write_text(yaml.safe_dump({
        "_base_": [str(RECIPES / "_base_" / "models" / "fpn_resnet18.yaml")],
        "data": {"num_classes": 3, "palette": PALETTE, "class_names": ["bg", "red", "blue"],
                 "train": {"source": {"type": "folder", "images_dir": str(images),
                                      "annotations_dir": str(masks)}}},
    }))  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "colours all match data.palette" in one_line_error(err) and "--palette" in err
    assert "5 of 5 masks are RGB colour images (3 distinct colours" in flat(out)
    painted = np.concatenate([i.ravel() for i in indices])
    for c, name in enumerate(["bg", "red", "blue"]):  # the classes the masks will hold
        assert int(class_row(out, name)[2]) == (painted == c).sum()

    # The printed command converts them; the converted masks hold exactly what was painted.
    monkeypatch.chdir(tmp_path)
    command = printed_command(out, "hooktrain data convert")
    assert command[:3] == ["hooktrain", "data", "convert"] and "OUT" in command
    code, _, err = cli(capsys, *[("converted" if a == "OUT" else a) for a in command[1:]])
    assert code == 0, err
    table = pq.read_table(sorted((tmp_path / "converted" / "data").glob("train-*.parquet")))
    for index, cell in zip(indices, table.column("annotation").to_pylist(), strict=True):
        mask = cv2.imdecode(np.frombuffer(cell["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and mask.dtype == np.uint8 and (mask == index).all()

    # The converted data trains as is, with the same class counts.
    files = tmp_path / "converted" / "data" / "train-*.parquet"
    parquet = f"data.train.source={{type: parquet, data_files: '{files}'}}"
    code, converted, err = cli(capsys, "data", "check", recipe, "--cfg-options", parquet)
    assert code == 0, err
    for name in ("bg", "red", "blue"):
        assert class_row(converted, name) == class_row(out, name)

    # A colour list file works the same way.
    colours = tmp_path / "colours.json"
    colours.write_text(json.dumps(PALETTE))
    code, _, err = cli(capsys, "data", "convert", images, tmp_path / "from_json",
                       "--annotations", masks, "--palette", colours)  # fmt: skip
    assert code == 0, err
    again = pq.read_table(sorted((tmp_path / "from_json" / "data").glob("train-*.parquet")))
    assert again.column("annotation").to_pylist() == table.column("annotation").to_pylist()


def test_unknown_colours_in_check_and_convert(tmp_path, capsys):
    indices = [paint(i) for i in range(3)]
    images, masks = write_colour_folder(tmp_path / "raw", indices)
    rgb = np.asarray(PALETTE, np.uint8)[indices[1]]
    rgb[1, 3] = [7, 7, 7]
    rgb[4, 0] = rgb[5, 9] = [255, 0, 1]
    (masks / "001.png").write_bytes(png(rgb))
    colours = tmp_path / "colours.yaml"
    colours.write_text(yaml.safe_dump(PALETTE))

    code, out, err = cli(capsys, "data", "convert", images, tmp_path / "out",
                         "--annotations", masks, "--shards", "3", "--palette", colours)  # fmt: skip
    assert code == 2
    err = one_line_error(err)
    assert "001.png has 2 colour(s) that are not in the palette" in err
    assert "[7, 7, 7] at (x=3, y=1) (1 px)" in err and "[255, 0, 1] at (x=0, y=4) (2 px)" in err
    assert not list((tmp_path / "out" / "data").glob("*.parquet"))  # nothing half-written

    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, num_classes=3, palette=PALETTE)
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options",
                         f"data.train.source={{type: folder, images_dir: '{images}', "
                         f"annotations_dir: '{masks}'}}")  # fmt: skip
    assert code == 2 and "2 of their colours are not in data.palette" in one_line_error(err)
    assert f"[255, 0, 1] (2 px, first at {masks / '001.png'} (row 1) x=0 y=4)" in flat(out)


def test_corrupt_images_and_mismatched_sizes_are_reported(tmp_path, capsys):
    masks = [np.full((4, 6), i % 3, np.uint8) for i in range(5)]
    recipe = write_recipe(tmp_path / "c.yaml", write_split(tmp_path, masks, corrupt=(2,)),
                          num_classes=3)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 0, err  # one undecodable example: training skips it
    assert "1 corrupt" in out and "train_2.png (row 2): image:" in out
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options", "data.max_corrupt=0")
    assert code == 2 and "more than data.max_corrupt=0" in one_line_error(err)

    masks[3] = np.zeros((5, 6), np.uint8)
    write_split(tmp_path / "sizes", masks, image_shape=(4, 6))
    recipe = write_recipe(tmp_path / "s.yaml", tmp_path / "sizes", num_classes=3)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "1 masks differ in size from their images (e.g. train_3.png (row 3))" in err
    assert "image 4 x 6, mask 5 x 6" in flat(out)


def test_class_weights_are_median_frequency_and_paste_into_config(tmp_path, capsys):
    a = np.zeros((4, 4), np.uint8)
    a[0] = 1  # image a: class 0 12 px, class 1 4 px
    b = np.zeros((4, 4), np.uint8)
    b[2:] = 2  # image b: class 0 8 px, class 2 8 px
    recipe = write_recipe(tmp_path / "w.yaml", write_split(tmp_path, [a, b]), num_classes=3)
    # f = [20/32, 4/16, 8/16], median 0.5, w = median / f
    expected = [0.8, 2.0, 1.0]
    aux = "model.aux_head={}"  # an auxiliary head too: both get the weights
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options", aux)
    assert code == 0, err
    assert "median frequency balancing" in out
    options = printed_command(out, "--cfg-options 'model.decode_head")
    assert options[1:] == [  # the heads' whole loss lists, as the recipe resolves them
        f"model.decode_head.losses=[{{type: cross_entropy, class_weight: {expected}}}]",
        f"model.aux_head.losses=[{{type: cross_entropy, weight: 0.4, class_weight: {expected}}}]",
    ]
    code, config, err = cli(capsys, "config", recipe, "--cfg-options", aux, *options[1:])
    assert code == 0, err
    resolved = yaml.safe_load(config)["model"]
    assert resolved["decode_head"]["losses"][0]["class_weight"] == expected
    assert resolved["aux_head"]["losses"][0]["class_weight"] == expected

    # A recipe whose class_weight has the wrong length is a problem.
    two_weights = "model.decode_head.losses=[{type: dice, class_weight: [1, 2]}]"
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options", two_weights)
    assert code == 2 and "class_weight has 2 entries for 3 classes" in one_line_error(err)


def test_split_and_limit(tmp_path, capsys):
    train = [np.full((4, 4), i % 3, np.uint8) for i in range(5)]
    val = [np.full((4, 4), 1, np.uint8) for _ in range(4)]
    val[2][0, 0] = 9  # out of range, in the third val example only
    write_split(tmp_path, train)
    write_split(tmp_path, val, split="val")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, num_classes=3)

    code, out, err = cli(capsys, "data", "check", recipe, "--limit", "2")
    assert code == 0 and "data.train.source (parquet) in" in out and "2 examples read" in out
    code, out, err = cli(capsys, "data", "check", recipe, "--split", "val")
    assert code == 2 and "4 examples read" in out
    assert "mask values [9] are out of range [0, 3)" in one_line_error(err)
    assert "data.val.source" in err and "val_2.png (row 2)" in out
    code, out, err = cli(capsys, "data", "check", recipe, "--split", "val", "--limit", "2")
    assert code == 0, err  # the bad example is the third


def test_convert_pairs_cityscapes_by_suffix(tmp_path, capsys):
    from test_dataset_bases import write_cityscapes_folder

    # Two cities of two images; gtFine holds labelIds, labelTrainIds, colour and instanceIds
    # PNGs (and polygons) for each.
    names = write_cityscapes_folder(tmp_path / "cityscapes")["train"]
    images = tmp_path / "cityscapes" / "leftImg8bit" / "train"
    gt = tmp_path / "cityscapes" / "gtFine" / "train"
    pairs = [(images / f"{n}_leftImg8bit.png", gt / f"{n}_gtFine_labelIds.png") for n in names]

    # By file stem (the default), no image has a partner: the suffixes differ.
    code, _, err = cli(capsys, "data", "convert", images, tmp_path / "stems",
                       "--annotations", gt, "--split", "train")  # fmt: skip
    assert code == 2 and "have no partner" in one_line_error(err)

    code, out, err = cli(capsys, "data", "convert", images, tmp_path / "out", "--annotations", gt,
                         "--img-suffix", "_leftImg8bit.png",
                         "--seg-map-suffix", "_gtFine_labelIds.png", "--split", "train",
                         "--shards", "2")  # fmt: skip
    assert code == 0, err
    assert out.splitlines() == [f"train: 2 parquet files in {tmp_path / 'out' / 'data'}"]
    table = pq.read_table(sorted((tmp_path / "out" / "data").glob("train-*.parquet")))
    rows = list(zip(table.column("image").to_pylist(), table.column("annotation").to_pylist(),
                    strict=True))  # fmt: skip
    assert len(rows) == len(pairs) == 4  # every image once, in name order across the cities
    for (image, mask), (image_cell, mask_cell) in zip(pairs, rows, strict=True):
        assert image_cell == {"bytes": image.read_bytes(), "path": image.name}
        assert mask_cell == {"bytes": mask.read_bytes(), "path": mask.name}  # the labelIds file


def test_bad_input_is_one_line(tmp_path, capsys):
    write_split(tmp_path, [np.zeros((4, 4), np.uint8)])
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, num_classes=3)
    for argv, expected in (
        ([tmp_path / "missing.yaml"], "missing.yaml"),
        ([recipe, "--cfg-options", "data.nope=1"], "unknown recipe key 'data.nope'"),
        ([recipe, "--cfg-options", "data.val=null", "--split", "val"], "has no data.val"),
        ([recipe, "--cfg-options", "data.train.source.image_column=img"], "column 'img' not found"),
        ([recipe, "--limit", "0"], "--limit must be at least 1"),
    ):
        code, _, err = cli(capsys, "data", "check", *argv)
        assert code == 2 and expected in one_line_error(err), err
    code, _, err = cli(capsys, "data", "convert", tmp_path, tmp_path / "o", "--palette", recipe)
    assert code == 2 and "sets no data.palette" in one_line_error(err)
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2, 3], [4, 5]]")
    code, _, err = cli(capsys, "data", "convert", tmp_path, tmp_path / "o", "--palette", bad)
    assert code == 2 and re.search(r"palette entry 1 is \[4, 5\]", one_line_error(err))


def test_printed_convert_command_keeps_the_folder_suffixes(tmp_path, capsys, monkeypatch):
    """A folder source pairing `<name>_img.png` with `<name>_mask.png` (RGB): the printed
    `data convert --palette` line carries both suffixes and converts every pair."""
    indices = [paint(i) for i in range(3)]
    images, masks = write_colour_folder(tmp_path / "raw", indices)
    for folder, suffix in ((images, "_img.png"), (masks, "_mask.png")):
        for path in folder.iterdir():
            path.rename(path.with_name(path.stem + suffix))
    recipe = tmp_path / "suffixed.yaml"
    recipe.write_text(yaml.safe_dump({
        "_base_": [str(RECIPES / "_base_" / "models" / "fpn_resnet18.yaml")],
        "data": {"num_classes": 3, "palette": PALETTE,
                 "train": {"source": {"type": "folder", "images_dir": str(images),
                                      "annotations_dir": str(masks), "img_suffix": "_img.png",
                                      "seg_map_suffix": "_mask.png"}}},
    }))  # fmt: skip
    code, out, _ = cli(capsys, "data", "check", recipe)
    command = printed_command(out, "hooktrain data convert")
    assert code == 2 and command[-6:-2] == ["--img-suffix", "_img.png", "--seg-map-suffix",
                                             "_mask.png"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *[("converted" if a == "OUT" else a) for a in command[1:]])
    assert code == 0, err
    table = pq.read_table(sorted((tmp_path / "converted" / "data").glob("train-*.parquet")))
    assert table.num_rows == 3
