"""The Cityscapes and Pascal VOC 2012 aug dataset bases, and the folder layouts they read.

Tiny copies of the official layouts come from tests/dataset_layouts.py
(``write_cityscapes_folder``, ``write_voc_folder``; docs' command tests use them too): the
folder source must pair their files as MMSegmentation does, the label handling must give
trainIds / class indices exactly, and each recipe must train and validate end to end on its
copy through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import RECIPES, run_cli
from dataset_layouts import (
    CITYSCAPES_LABEL_TABLE, MMSEG_CITYSCAPES_CLASSES, MMSEG_CITYSCAPES_PALETTE, MMSEG_VOC_CLASSES,
    MMSEG_VOC_PALETTE, TRAIN_ID, VOC_SPLITS, cityscapes_label_ids, voc_mask, write_cityscapes_folder,
    write_palette_png, write_voc_folder,
)  # fmt: skip
from PIL import Image

from hooktrain.data import DataConfig, build_train_stream, build_val_loader
from hooktrain.data.folder import folder_pairs, source_pairs
from hooktrain.data.labels import LabelMapper, decode_mask
from hooktrain.errors import UserError
from hooktrain.recipe.data import FolderSource
from hooktrain.recipe.schema import load_recipe

TINY = (  # two iterations at 32x32 on the tiny copies; no ImageNet download
    "--cfg-options train.max_iters=2 schedule.warmup_iters=0 model.encoder.pretrained=false "
    "data.train.batch_size=2 data.train.num_workers=0 data.train.shuffle_buffer=8 "
    "data.val.num_workers=0 data.train.pipeline.scale=[64,32] "
    "data.train.pipeline.crop_size=[32,32] data.val.pipeline.scale=[64,32]"
)


# -- class names and palettes against MMSegmentation -----------------------------------------


def _base(name: str) -> dict:
    return yaml.safe_load((RECIPES / "_base_" / "datasets" / name).read_text())["data"]


def test_cityscapes_base_matches_mmseg_and_cityscapesscripts():
    data = _base("cityscapes.yaml")
    assert tuple(data["class_names"]) == MMSEG_CITYSCAPES_CLASSES
    assert data["palette"] == MMSEG_CITYSCAPES_PALETTE
    assert data["label_map"] == dict(CITYSCAPES_LABEL_TABLE)
    assert (data["num_classes"], data["ignore_index"], data["reduce_zero_label"]) == (19, 255, False)
    train, val = data["train"]["pipeline"], data["val"]["pipeline"]
    assert (train["scale"], train["ratio_range"], train["crop_size"]) == ([2048, 1024], [0.5, 2.0], [512, 1024])
    assert train["cat_max_ratio"] == 0.75 and val["scale"] == [2048, 1024]


def test_voc_base_matches_mmseg():
    data = _base("pascal_voc12_aug.yaml")
    assert tuple(data["class_names"]) == MMSEG_VOC_CLASSES
    assert data["palette"] == MMSEG_VOC_PALETTE
    assert (data["num_classes"], data["ignore_index"], data["reduce_zero_label"]) == (21, 255, False)
    assert "label_map" not in data
    train, val = data["train"]["pipeline"], data["val"]["pipeline"]
    assert (train["scale"], train["ratio_range"], train["crop_size"]) == ([2048, 512], [0.5, 2.0], [512, 512])
    assert val["scale"] == [2048, 512]


def test_both_recipes_load_with_hooktrain_config(capsys):
    from hooktrain.cli import main  # in-process: `hooktrain config RECIPE`

    for recipe, classes, crop in (("cityscapes", 19, "[512, 1024]"), ("voc12aug", 21, "[512, 512]")):
        with pytest.raises(SystemExit) as exit_info:
            main(["config", str(RECIPES / f"{recipe}.yaml")])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and f"num_classes: {classes}" in out
        assert f"crop_size: {crop}" in out


# -- label handling ----------------------------------------------------------------------------


def test_cityscapes_label_map_gives_train_ids_exactly():
    data = load_recipe(RECIPES / "cityscapes.yaml").data
    mapper = LabelMapper(data.num_classes, data.ignore_index, data.reduce_zero_label,
                         data.label_map, data.out_of_range)  # fmt: skip
    label_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    assert np.array_equal(mapper(label_ids), TRAIN_ID[label_ids])
    known = np.array([[7, 26, 0, 8, 33, 24, 9, 255]], np.uint8)  # road, car, unlabeled, ...
    assert mapper(known).tolist() == [[0, 13, 255, 1, 18, 11, 255, 255]]
    with pytest.raises(UserError, match=r"values \[34\]"):
        mapper(np.array([[34]], np.uint8))  # not a labelId: reported, not silently scored


def test_voc_palette_pngs_decode_to_indices_with_void(tmp_path):
    mask = voc_mask(3)
    write_palette_png(tmp_path / "m.png", mask)
    assert Image.open(tmp_path / "m.png").mode == "P"
    by_opencv = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
    assert by_opencv.shape == (*mask.shape, 3)  # OpenCV expands a palette PNG to its colours
    decoded = decode_mask((tmp_path / "m.png").read_bytes())
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)
    assert set(np.unique(decoded)) == {0, 4, 11, 255}
    assert np.array_equal(decode_mask({"bytes": None, "path": str(tmp_path / "m.png")}), mask)


# -- the folder source on the official layouts -------------------------------------------------


def _names(pairs, root: Path, suffix: str) -> list[str]:
    return [Path(img).relative_to(root).as_posix().removesuffix(suffix) for img, _ in pairs]


def test_folder_source_pairs_cityscapes_recursively_by_suffix(tmp_path):
    root = tmp_path / "cityscapes"
    names = write_cityscapes_folder(root)
    for split in ("train", "val"):
        source = FolderSource(root=str(root), images_dir=f"leftImg8bit/{split}",
                              annotations_dir=f"gtFine/{split}", img_suffix="_leftImg8bit.png",
                              seg_map_suffix="_gtFine_labelIds.png")  # fmt: skip
        pairs = source_pairs(source, "data.train.source")
        assert _names(pairs, root / "leftImg8bit" / split, "_leftImg8bit.png") == sorted(names[split])
        for image, annotation in pairs:
            assert annotation == image.replace("leftImg8bit", "gtFine", 1).replace(
                "_leftImg8bit.png", "_gtFine_labelIds.png")  # fmt: skip
    # mmseg's converted files pair the same way
    trainids = FolderSource(root=str(root), images_dir="leftImg8bit/val",
                            annotations_dir="gtFine/val", img_suffix="_leftImg8bit.png",
                            seg_map_suffix="_gtFine_labelTrainIds.png")  # fmt: skip
    assert all(a.endswith("_labelTrainIds.png") for _, a in source_pairs(trainids, "x"))
    flat = trainids.model_copy(update={"recursive": False})
    with pytest.raises(UserError, match="no images found .*set recursive: true"):
        source_pairs(flat, "data.val.source")
    # mmseg's converter also writes split files of 'city/name' lines
    listed_names = ["frankfurt/frankfurt_000001_000020", "frankfurt/frankfurt_000000_000019"]
    (root / "val.txt").write_text("\n".join(listed_names) + "\n")
    listed = trainids.model_copy(update={"split_file": "val.txt"})
    listed_pairs = source_pairs(listed, "x")
    assert _names(listed_pairs, root / "leftImg8bit" / "val", "_leftImg8bit.png") == listed_names


def test_folder_source_reads_voc_aug_in_split_order_with_one_mask_dir_per_list(tmp_path):
    voc = write_voc_folder(tmp_path / "VOCdevkit")
    lists = "ImageSets/Segmentation"
    train = FolderSource(root=str(voc), images_dir="JPEGImages", img_suffix=".jpg",
                         annotations_dir=["SegmentationClass", "SegmentationClassAug"],
                         split_file=[f"{lists}/train.txt", f"{lists}/aug.txt"])  # fmt: skip
    pairs = source_pairs(train, "data.train.source")
    assert [Path(i).stem for i, _ in pairs] == VOC_SPLITS["train"] + VOC_SPLITS["aug"]
    folders = [Path(a).parent.name for _, a in pairs]
    assert folders == ["SegmentationClass"] * 4 + ["SegmentationClassAug"] * 4
    first = decode_mask({"path": pairs[0][1]})  # the VOC mask, not SBD's
    assert np.array_equal(first, voc_mask(0, first.shape))
    val = FolderSource(root=str(voc), images_dir="JPEGImages", annotations_dir="SegmentationClass",
                       split_file=f"{lists}/val.txt")  # fmt: skip (img_suffix null: any extension)
    assert [Path(i).stem for i, _ in source_pairs(val, "data.val.source")] == VOC_SPLITS["val"]

    with open(voc / lists / "val.txt", "a") as listed:
        listed.write("2012_000404\n")
    with pytest.raises(UserError, match=r"data.val.source: 1 of the 4 names in .*val.txt have no "
                                        r"image \(e.g. '2012_000404': no .*2012_000404.jpg\); fix "
                                        r"data.val.source.split_file"):  # fmt: skip
        source_pairs(val, "data.val.source")
    unlisted = (voc / "JPEGImages" / "2012_999999.jpg").read_bytes()
    (voc / "JPEGImages" / "2012_000404.jpg").write_bytes(unlisted)
    with pytest.raises(UserError, match=r"no annotation \(e.g. '2012_000404': no "
                                        r".*SegmentationClass/2012_000404.png"):  # fmt: skip
        source_pairs(val, "data.val.source")
    with pytest.raises(UserError, match="split_file: cannot read .*nowhere.txt"):
        source_pairs(val.model_copy(update={"split_file": "nowhere.txt"}), "data.val.source")
    with pytest.raises(ValueError, match="annotations_dir lists 2 directories, so split_file must"):
        FolderSource(root=str(voc), images_dir="JPEGImages", annotations_dir=["a", "b"],
                     split_file="x.txt")  # fmt: skip
    every_image = FolderSource(root=str(voc), images_dir="JPEGImages",
                               annotations_dir="SegmentationClass")  # fmt: skip
    with pytest.raises(UserError, match="6 files have no partner .* has no annotation"):
        source_pairs(every_image, "x")  # no split file: every image, and aug's have no mask here


def test_cityscapes_label_train_ids_need_no_label_map(tmp_path):
    """mmseg's converted `_gtFine_labelTrainIds.png` with `data.label_map={}` give the same
    masks as the official labelIds through the recipe's label_map."""
    root = tmp_path / "cityscapes"
    write_cityscapes_folder(root)
    masks = []
    for suffix, options in (("labelIds", []), ("labelTrainIds", ["data.label_map={}"])):
        source = (f"data.val.source={{type: folder, root: '{root}', images_dir: leftImg8bit/val, "
                  f"annotations_dir: gtFine/val, img_suffix: _leftImg8bit.png, "
                  f"seg_map_suffix: _gtFine_{suffix}.png}}")  # fmt: skip
        data = load_recipe(RECIPES / "cityscapes.yaml", [source, "data.val.num_workers=0", *options]).data
        masks.append([m for batch in build_val_loader(data) for m in batch["mask"]])
    assert len(masks[0]) == 2 and all((a == b).all() for a, b in zip(*masks, strict=True))
    assert np.array_equal(masks[0][0].numpy(), TRAIN_ID[cityscapes_label_ids(4)])  # 1st val image


def test_folder_pairs_keeps_its_three_argument_form_and_skips_hidden_files(tmp_path):
    for d in ("img", "ann", "img/.cache"):
        (tmp_path / d).mkdir()
    for stem in ("b", "a"):
        cv2.imwrite(str(tmp_path / "img" / f"{stem}.jpg"), np.zeros((4, 4, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "ann" / f"{stem}.png"), np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "._a.jpg").write_bytes(b"AppleDouble")
    (tmp_path / "img" / ".cache" / "c.jpg").write_bytes(b"")
    pairs = folder_pairs(tmp_path / "img", tmp_path / "ann", "convert img")
    assert [(Path(i).name, Path(a).name) for i, a in pairs] == [("a.jpg", "a.png"), ("b.jpg", "b.png")]


def test_voc_stream_and_val_loader_see_indices_and_void(tmp_path):
    voc = write_voc_folder(tmp_path / "VOCdevkit")
    cfg = load_recipe(RECIPES / "voc12aug.yaml").data.model_dump()
    source = {"type": "folder", "root": str(voc), "images_dir": "JPEGImages",
              "annotations_dir": "SegmentationClass", "split_file": "ImageSets/Segmentation/val.txt"}  # fmt: skip
    cfg["val"].update(source=source, num_workers=0)
    cfg["train"].update(source=source, num_workers=0, batch_size=3)
    cfg["train"]["pipeline"].update(scale=[64, 32], crop_size=[16, 16])
    data = DataConfig.model_validate(cfg)
    masks = [m for batch in build_val_loader(data) for m in batch["mask"]]
    assert len(masks) == 3
    for i, mask in enumerate(masks):
        expected = voc_mask(4 + i, (24 + 2 * ((4 + i) % 3), 40))
        assert np.array_equal(mask[: expected.shape[0], : expected.shape[1]].numpy(), expected)
    batch = next(build_train_stream(data, seed=0))
    assert set(batch["mask"].unique().tolist()) <= set(range(21)) | {255}


# -- end to end through the CLI ------------------------------------------------------------------


def _trained(work_dir: Path) -> dict:
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 2
    return rows[-1]


def test_cityscapes_recipe_trains_and_validates_on_the_official_layout(tmp_path):
    root = tmp_path / "data" / "cityscapes"
    write_cityscapes_folder(root)
    sources = [
        f"data.{key}.source={{type: folder, root: data/cityscapes, images_dir: leftImg8bit/{split}, "
        f"annotations_dir: gtFine/{split}, img_suffix: _leftImg8bit.png, "
        f"seg_map_suffix: _gtFine_labelIds.png}}"
        for key, split in (("train", "train"), ("val", "val"))
    ]
    work_dir = tmp_path / "work"
    result = run_cli(str(RECIPES / "cityscapes.yaml"), "--work-dir", str(work_dir),
                     *TINY.split(), *sources, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "val/mIoU" in _trained(work_dir)
    assert "validation at iter 2 on 2 images" in result.stdout + result.stderr
    table = (result.stdout + result.stderr).split("validation at iter 2", 1)[1]
    assert "traffic light" in table and "bicycle" in table


def test_voc_recipe_trains_and_validates_on_the_official_layout(tmp_path):
    write_voc_folder(tmp_path / "data" / "VOCdevkit")
    voc = "root: data/VOCdevkit/VOC2012, images_dir: JPEGImages, img_suffix: .jpg"
    sources = [
        f"data.train.source={{type: folder, {voc}, annotations_dir: [SegmentationClass, "
        "SegmentationClassAug], split_file: [ImageSets/Segmentation/train.txt, "
        "ImageSets/Segmentation/aug.txt]}",
        f"data.val.source={{type: folder, {voc}, annotations_dir: SegmentationClass, "
        "split_file: ImageSets/Segmentation/val.txt}",
    ]
    work_dir = tmp_path / "work"
    result = run_cli(str(RECIPES / "voc12aug.yaml"), "--work-dir", str(work_dir), *TINY.split(),
                     *sources, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "val/mIoU" in _trained(work_dir)
    assert "validation at iter 2 on 3 images" in result.stdout + result.stderr
