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


def write_folder(root: Path, masks: list[np.ndarray], save=png) -> tuple[Path, Path]:
    """images/ and masks/: a random RGB PNG per mask, and the mask as ``save`` encodes it."""
    images, annotations = root / "images", root / "masks"
    images.mkdir(parents=True)
    annotations.mkdir()
    for i, mask in enumerate(masks):
        rgb = np.random.default_rng(i).integers(0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
        (images / f"{i:03d}.png").write_bytes(png(rgb))
        (annotations / f"{i:03d}.png").write_bytes(save(mask))
    return images, annotations


def scene(seed: int, classes, *, void: int | None = None, sky: int | None = None,
          shape=(48, 64)) -> np.ndarray:  # fmt: skip
    """A scene-like index mask: 3 x 4 blocks of ``classes``, ``sky`` (a class) over the top
    third, and ``void`` in 2-pixel bands along every boundary, as annotators leave outlines."""
    blocks = np.random.default_rng(seed).choice(list(classes), (3, 4)).astype(np.uint8)
    mask = cv2.resize(blocks, shape[::-1], interpolation=cv2.INTER_NEAREST)
    if sky is not None:
        mask[: shape[0] // 3] = sky
    if void is not None:
        edge = np.zeros(shape, np.uint8)
        edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        edge[1:] |= mask[1:] != mask[:-1]
        mask[cv2.dilate(edge, np.ones((2, 2), np.uint8)) > 0] = void
    return mask


def folder_recipe(path: Path, images: Path, masks: Path, **data) -> Path:
    """A recipe: the quickstart's FPN model and a folder train source."""
    path.write_text(yaml.safe_dump({
        "_base_": [str(RECIPES / "_base_" / "models" / "fpn_resnet18.yaml")],
        "data": {**data, "train": {"source": {"type": "folder", "images_dir": str(images),
                                              "annotations_dir": str(masks)}}},
    }))  # fmt: skip
    return path


def pixels(out: str, name: str) -> int:
    """The pixels of class ``name`` in the report's class table."""
    return int(class_row(out, name)[2].replace(",", ""))


def ignored(out: str) -> int:
    """The ignored pixels in the report's class table."""
    row = next(line for line in out.splitlines() if "ignored (255)" in line)
    return int(row.split()[2].replace(",", ""))


@pytest.mark.parametrize("first", ["wall", "background"])
def test_ade20k_like_zero_other_needs_reduce_zero_label(tmp_path, capsys, first):
    """0..12 for 12 classes, 0 in thin bands along every boundary ("other", as in ADE20K): the
    evidence settles it whether the first class is a plain class or VOC-style "background"
    (which fits either reading); the other reading is still named; the fix trains right."""
    masks = [scene(i, range(1, 13), void=0) for i in range(12)]
    names = [first, *(f"thing{i}" for i in range(1, 12))]
    recipe = folder_recipe(tmp_path / "ade.yaml", *write_folder(tmp_path / "d", masks),
                           num_classes=12, class_names=names)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "0 appears and 12 is the maximum: reduce_zero_label is probably wanted" in (
        one_line_error(err)
    )
    assert "label_map" not in err  # one fix recommended ...
    report = flat(out)
    assert "The evidence points to 0: 0 gathers along boundaries" in report and "(strong)" in report
    assert "The other reading, 12 void and 0 a class" in report  # ... the other one named
    assert "data.label_map={12: 255}" in report
    assert "Class weights: not computed" in out  # they would be for the wrong classes

    fix = printed_command(out, "--cfg-options data.reduce_zero_label")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0 and err == "", err
    assert "Classes (after reduce_zero_label; 12 classes" in out
    raw = np.concatenate([m.ravel() for m in masks])
    assert pixels(out, first) == (raw == 1).sum()  # raw 1 is class 0; raw 0 is ignored
    assert ignored(out) == (raw == 0).sum()
    assert "Class weights by median frequency balancing" in out


def test_camvid_like_void_last_is_not_reduce_zero_label(tmp_path, capsys):
    """Issue 30: 0..10 classes with 0 = sky over a third of every image and 11 = void along the
    boundaries (as CamVid). The old advice, reduce_zero_label, would ignore the sky and shift
    every class: the check maps 11 to the ignore index instead, through the console command."""
    masks = [scene(i, range(1, 11), void=11, sky=0) for i in range(12)]
    names = ["sky", "road", "car", "tree", "sidewalk", "fence", "person", "bike", "sign", "pole",
             "house"]  # fmt: skip
    recipe = folder_recipe(tmp_path / "camvid.yaml", *write_folder(tmp_path / "d", masks),
                           num_classes=11, class_names=names)  # fmt: skip
    result = run_cli("data", "check", str(recipe))  # the console command, as a user runs it
    assert result.returncode == 2, result.stdout + result.stderr
    err = one_line_error(result.stderr)
    assert "11 is probably a void label, map it to the ignore index" in err
    assert "reduce_zero_label" not in err
    report = flat(result.stdout)
    assert "The evidence points to 11: 11 gathers along boundaries" in report
    assert "The other reading, 0 'other' (reduce_zero_label), would ignore class 0 (sky)" in report
    assert not any(line.strip().startswith("--cfg-options data.reduce_zero_label")
                   for line in result.stdout.splitlines())  # fmt: skip

    fix = printed_command(result.stdout, "--cfg-options 'data.label_map=")
    assert fix == ["--cfg-options", "data.label_map={11: 255}"]
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    raw = np.concatenate([m.ravel() for m in masks])
    assert pixels(out, "sky") == (raw == 0).sum()  # the sky stays class 0
    assert pixels(out, "house") == (raw == 10).sum()
    assert ignored(out) == (raw == 11).sum()


def test_balanced_evidence_prints_both_readings(tmp_path, capsys):
    """0 and 12 both solid blocks in every mask: nothing tells them apart, so the problem names
    both readings and how to choose, and both printed fixes work; a known dataset's class names
    (SegNet's CamVid) settle it."""
    masks = []
    for i in range(8):
        mask = scene(i, range(13))
        mask[:16, :16], mask[:16, 16:32] = 0, 12
        masks.append(mask)
    images, annotations = write_folder(tmp_path / "d", masks)
    recipe = folder_recipe(tmp_path / "r.yaml", images, annotations, num_classes=12)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    err = one_line_error(err)
    assert "do not tell which is not a class: if 0 is 'other' (as in ADE20K) set " \
           "data.reduce_zero_label=true, if 12 is void set data.label_map={12: 255}" in err  # fmt: skip
    assert "the evidence does not settle it: nothing in these examples tells them apart" in flat(out)
    lines = [line.strip() for line in out.splitlines()]
    assert lines[lines.index("if 0 is 'other' (as in ADE20K):") + 1] == (
        "--cfg-options data.reduce_zero_label=true")
    assert lines[lines.index("if 12 is void:") + 1] == "--cfg-options 'data.label_map={12: 255}'"
    for start in ("--cfg-options data.reduce_zero_label", "--cfg-options 'data.label_map="):
        code, _, err = cli(capsys, "data", "check", recipe, *printed_command(out, start))
        assert code == 0, err

    camvid = ["Sky", "Building", "Pole", "Road", *(f"c{i}" for i in range(8))]
    recipe = folder_recipe(tmp_path / "camvid.yaml", images, annotations, num_classes=12,
                           class_names=camvid)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2 and "12 is probably a void label" in one_line_error(err)
    assert "data.class_names are CamVid's, whose masks hold 12 = void (strong)" in flat(out)


def test_one_based_masks_without_0(tmp_path, capsys):
    """1..12 and no 0 for 12 classes: 1-based masks (or 'other' that these examples lack), or
    12 void with class 0 missing. Twenty masks without a 0 and 12 in regions settle it for
    reduce_zero_label; eight only lean, so both readings are printed. (The old advice, raise
    num_classes or map 12 to the ignore index, was wrong for 1-based masks.)"""
    masks = [scene(i, range(1, 13)) for i in range(20)]
    masks[0][:16, :16] = 12
    images, annotations = write_folder(tmp_path / "d", masks)
    recipe = folder_recipe(tmp_path / "r.yaml", images, annotations, num_classes=12)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "no 0 appears and 12 is the maximum: reduce_zero_label is probably wanted (the masks " \
           "look 1-based" in one_line_error(err)  # fmt: skip
    assert "none of the 20 masks holds a 0 (strong)" in flat(out)
    code, out, err = cli(capsys, "data", "check", recipe,
                         *printed_command(out, "--cfg-options data.reduce_zero_label"))  # fmt: skip
    assert code == 0, err
    raw = np.concatenate([m.ravel() for m in masks])
    assert pixels(out, "class_0") == (raw == 1).sum() and pixels(out, "class_11") == (raw == 12).sum()

    code, out, err = cli(capsys, "data", "check", recipe, "--limit", "8")
    assert code == 2
    assert "the masks hold 1..12 (no 0), one value more than num_classes=12, and these examples " \
           "do not tell which is not a class: if the masks are 1-based" in one_line_error(err)  # fmt: skip
    assert "none of the 8 masks holds a 0 (weak)" in flat(out)
    assert printed_command(out, "--cfg-options 'data.label_map=") == [
        "--cfg-options", "data.label_map={12: 255}"]  # fmt: skip


def voc_palette_png(index: np.ndarray) -> bytes:
    """A palette PNG (mode P) with VOC's colour map, as VOC's SegmentationClass files."""
    from io import BytesIO

    from PIL import Image

    colours = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c = i
        for bit in range(8):
            for channel in range(3):
                colours[i, channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
    image = Image.fromarray(index, mode="P")
    image.putpalette(colours.ravel().tolist())
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_voc_like_palette_masks_keep_background_as_a_class(tmp_path, capsys):
    """VOC: palette PNGs holding 0..20 (0 = background, a class) and 255 outlines. They are
    index masks, not colour masks; reduce_zero_label is never recommended, and turned on it is
    a problem; with num_classes 20 (background forgotten) all three readings are offered."""
    masks = [scene(i, [0, 0, 0, 0, *range(1, 21)], void=255) for i in range(12)]
    masks[0][-8:, -8:] = 20
    images, annotations = write_folder(tmp_path / "voc", masks, save=voc_palette_png)
    recipe = folder_recipe(tmp_path / "voc.yaml", images, annotations, num_classes=21)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 0, err
    assert "stored as     PNG P (palette indices, uint8): 12" in out
    assert "colour" not in out and "reduce_zero_label" not in out

    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options",
                         "data.reduce_zero_label=true")  # fmt: skip
    assert code == 2
    assert "reduce_zero_label is on but 0 looks like a class" in one_line_error(err)
    assert "the ignore index 255 lies along the boundaries" in flat(out)
    fix = printed_command(out, "--cfg-options data.reduce_zero_label")
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options",
                         "data.reduce_zero_label=true", *fix[1:])  # fmt: skip
    assert code == 0, err

    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options", "data.num_classes=20")
    assert code == 2
    err = one_line_error(err)
    assert "data.reduce_zero_label=true, if 20 is void set data.label_map={20: 255}, if all are " \
           "classes set data.num_classes=21" in err  # fmt: skip
    assert "The masks also hold the ignore index 255" in flat(out)
    fix = printed_command(out, "--cfg-options data.num_classes=21")
    code, out, err = cli(capsys, "data", "check", recipe, "--cfg-options", "data.num_classes=20",
                         *fix[1:])  # fmt: skip
    assert code == 0, err


def test_cityscapes_label_ids_without_label_map(tmp_path, capsys):
    """labelIds settle it when the 19 evaluated ids hold most pixels; values spread evenly over
    0..33 could as well be a 34-class dataset: both readings, and both fixes work."""
    ids = np.array([0, 7, 8, 11, 21, 23, 26, 33], np.uint8)  # unlabeled, road, ..., bicycle
    masks = [np.repeat(np.roll(ids, i), 4).reshape(4, 8) for i in range(4)]
    recipe = write_recipe(tmp_path / "city.yaml", write_split(tmp_path, masks), num_classes=19)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "values up to 33: Cityscapes labelIds, use the label_map" in one_line_error(err)
    assert "the 19 evaluated labelIds hold 88% of the pixels" in flat(out)
    assert "The other reading, the class indices of a dataset with 34" in flat(out)

    fix = printed_command(out, "--cfg-options 'data.label_map=")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    assert int(class_row(out, "class_0")[2]) == 4 * 4  # road: labelId 7 becomes trainId 0
    assert int(class_row(out, "class_18")[2]) == 4 * 4  # bicycle: 33 becomes 18

    spread = [(np.arange(34 * 4, dtype=np.uint8).reshape(8, 17) + i) % 34 for i in range(4)]
    recipe = write_recipe(tmp_path / "ids.yaml", write_split(tmp_path / "spread", spread),
                          num_classes=19, class_names=[f"c{i}" for i in range(19)])  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "Cityscapes labelIds (use the label_map the report prints) or the classes of a " \
           "dataset with 34 (set data.num_classes=34)" in one_line_error(err)  # fmt: skip
    assert "only 56% of the pixels" in flat(out)
    for start in ("--cfg-options 'data.label_map=", "--cfg-options data.num_classes=34"):
        fix = printed_command(out, start)
        code, _, err = cli(capsys, "data", "check", recipe, *fix)
        assert code == 0, err  # the 34-class fix pads class_names to 34
    assert fix[2].startswith("data.class_names=[c0, c1,") and fix[2].endswith("class_33]")


def test_binary_0_255_masks_and_zero_based_masks_with_reduce_zero_label(tmp_path, capsys):
    binary = []
    for i in range(12):  # a solid foreground in each of 12 masks: binary, settled
        mask = np.zeros((24, 24), np.uint8)
        mask[i : i + 12, 6:18] = 255
        binary.append(mask)
    recipe = write_recipe(tmp_path / "bin.yaml", write_split(tmp_path / "b", binary), num_classes=2)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2 and "255 is the ignore index, so the foreground is never learnt" in (
        one_line_error(err)
    )
    assert "none of the 12 masks holds a class but 0" in flat(out)
    assert "The other reading: 255 is void" in flat(out)
    fix = printed_command(out, "--cfg-options data.num_classes=1 data.mask_scale=255")
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    assert "binary: background and foreground" in out
    assert pixels(out, "foreground") == 12 * 144  # 255 is the foreground

    outlines = []
    for i in range(3):  # thin 255 outlines in 3 masks: void around unseen objects, or not
        mask = np.zeros((24, 32), np.uint8)
        cv2.rectangle(mask, (4 + i, 4), (20, 18), 255, 2)
        outlines.append(mask)
    recipe = write_recipe(tmp_path / "o.yaml", write_split(tmp_path / "o", outlines),
                          num_classes=21, class_names=[f"c{i}" for i in range(21)])  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2
    assert "if 255 is the foreground, train binary masks (num_classes 1, mask_scale 255, " \
           "ignore_index 254); if it is void, these examples hold only class 0" in (
        one_line_error(err))  # fmt: skip
    assert "thin bands, as void outlines are" in flat(out)
    assert printed_command(out, "hooktrain data check") == [
        "hooktrain", "data", "check", str(recipe), "--limit", "1000"]  # fmt: skip
    fix = printed_command(out, "--cfg-options data.num_classes=1")
    assert fix[2] == "data.class_names=null"  # 21 names do not fit a binary recipe
    code, _, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err

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


def test_16_bit_masks_plain_scaled_and_instance_coded(tmp_path, capsys):
    """uint16 class indices are read as they are; classes times 256 get the label_map that
    divides them; class x 1000 + instance is named as such, not 'raise num_classes to 26002'."""
    plain = [np.arange(48, dtype=np.uint16).reshape(6, 8) % 4 for _ in range(2)]
    recipe = write_recipe(tmp_path / "p.yaml", write_split(tmp_path / "p", plain), num_classes=4)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 0, err
    assert "PNG I;16 (1 channel, uint16)" in out

    scaled = [m * 256 for m in plain]
    scaled[0][0, :3] = 255 * 256  # void, scaled the same way
    recipe = write_recipe(tmp_path / "s.yaml", write_split(tmp_path / "s", scaled), num_classes=4)
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2 and "are class indices times 256" in one_line_error(err)
    fix = printed_command(out, "--cfg-options 'data.label_map=")
    assert fix[1] == "data.label_map={256: 1, 512: 2, 768: 3, 65280: 255}"
    code, out, err = cli(capsys, "data", "check", recipe, *fix)
    assert code == 0, err
    assert pixels(out, "class_1") == sum((m == 1).sum() for m in plain) - 1  # one became void
    assert ignored(out) == 3

    instances = np.full((6, 8), 7, np.uint16)  # road (a labelId), three instances of two classes
    instances[:3, :3], instances[:3, 4:], instances[4:, :4] = 26000, 26001, 24000
    recipe = write_recipe(tmp_path / "i.yaml", write_split(tmp_path / "i", [instances]),
                          num_classes=19)  # fmt: skip
    code, out, err = cli(capsys, "data", "check", recipe)
    assert code == 2 and "look like class x 1000 + instance" in one_line_error(err)
    assert "raise data.num_classes (to" not in out


def paint(seed: int, shape=(6, 10)) -> np.ndarray:
    """Random class indices 0..2 in blocks."""
    blocks = np.random.default_rng(seed).integers(0, len(PALETTE), (3, 5), dtype=np.uint8)
    return cv2.resize(blocks, shape[::-1], interpolation=cv2.INTER_NEAREST)


def write_colour_folder(root: Path, indices: list[np.ndarray]) -> tuple[Path, Path]:
    """images/ and masks/ with RGB PNG masks painted with PALETTE."""
    return write_folder(root, [np.asarray(PALETTE, np.uint8)[index] for index in indices])


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
    from dataset_layouts import write_cityscapes_folder

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
