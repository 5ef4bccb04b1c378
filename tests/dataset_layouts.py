"""What MMSegmentation 1.2.2 and the official tools say about the Cityscapes and Pascal VOC
2012 aug datasets, and tiny copies of their official folder layouts: written by
``write_cityscapes_folder`` and ``write_voc_folder`` for tests/data/test_dataset_bases.py and
the docs' command tests (tests/docs/test_doc_commands_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# -- what MMSegmentation 1.2.2 says (copied from its sources, file by file) ------------------

# mmseg/datasets/cityscapes.py, CityscapesDataset.METAINFO
MMSEG_CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
MMSEG_CITYSCAPES_PALETTE = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32],
]  # fmt: skip
# mmseg/datasets/voc.py, PascalVOCDataset.METAINFO
MMSEG_VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
MMSEG_VOC_PALETTE = [
    [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
    [0, 128, 128], [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0],
    [64, 0, 128], [192, 0, 128], [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0],
    [0, 192, 0], [128, 192, 0], [0, 64, 128],
]  # fmt: skip
# cityscapesscripts 2.3.0 helpers/labels.py: (labelId, trainId) of every label with an id >= 0
# (license plate, id -1, is never drawn into labelIds images).
CITYSCAPES_LABEL_TABLE = [
    (0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255), (7, 0), (8, 1),
    (9, 255), (10, 255), (11, 2), (12, 3), (13, 4), (14, 255), (15, 255), (16, 255), (17, 5),
    (18, 255), (19, 6), (20, 7), (21, 8), (22, 9), (23, 10), (24, 11), (25, 12), (26, 13),
    (27, 14), (28, 15), (29, 255), (30, 255), (31, 16), (32, 17), (33, 18),
]  # fmt: skip
TRAIN_ID = np.full(256, 255, np.uint8)
for _label_id, _train_id in CITYSCAPES_LABEL_TABLE:
    TRAIN_ID[_label_id] = _train_id
# The VOC devkit's colour map (VOCdevkit/VOCcode/VOClabelcolormap.m): index 255 is (224, 224, 192).
VOC_PNG_PALETTE = [*MMSEG_VOC_PALETTE, *[[0, 0, 0]] * (255 - 21), [224, 224, 192]]


# -- tiny copies of the official layouts ----------------------------------------------------

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
def cityscapes_label_ids(index: int) -> np.ndarray:
    """A 32x64 labelIds mask whose 8x8 blocks cycle through every labelId 0..33."""
    blocks = ((np.arange(4 * 8).reshape(4, 8) + 5 * index) % 34).astype(np.uint8)
    return cv2.resize(blocks, (64, 32), interpolation=cv2.INTER_NEAREST)


def write_cityscapes_folder(root: Path, per_city: int = 2) -> dict[str, list[str]]:
    """The official Cityscapes layout (leftImg8bit + gtFine with labelIds, labelTrainIds,
    colour and instance PNGs and polygon JSON) at 32x64; returns the names per split."""
    names: dict[str, list[str]] = {}
    index = 0
    for split, cities in CITIES.items():
        names[split] = []
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(per_city):
                name = f"{city}_{i:06d}_{19 + i:06d}"
                label_ids = cityscapes_label_ids(index)
                image = np.random.default_rng(index).integers(0, 256, (32, 64, 3), dtype=np.uint8)
                cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"), image)
                gt = root / "gtFine" / split / city / name
                cv2.imwrite(f"{gt}_gtFine_labelIds.png", label_ids)
                cv2.imwrite(f"{gt}_gtFine_labelTrainIds.png", TRAIN_ID[label_ids])
                colour = np.array([[0, 0, 0]] * 34, np.uint8)[label_ids]
                cv2.imwrite(f"{gt}_gtFine_color.png", colour)
                cv2.imwrite(f"{gt}_gtFine_instanceIds.png", label_ids.astype(np.uint16) * 1000)
                Path(f"{gt}_gtFine_polygons.json").write_text(json.dumps({"objects": []}))
                names[split].append(f"{city}/{name}")
                index += 1
    return names


def voc_mask(index: int, rng_size=(24, 40)) -> np.ndarray:
    """A VOC-style mask: background, one object class, and a 255 void border around it."""
    h, w = rng_size
    mask = np.zeros((h, w), np.uint8)
    cls = 1 + index % 20
    mask[4 : h - 4, 6 : w - 6] = 255
    mask[5 : h - 5, 7 : w - 7] = cls
    mask[h // 2 :, : w // 3] = 1 + (index + 7) % 20
    return mask


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask)  # mode L; putpalette makes it P with these colours
    image.putpalette([v for colour in VOC_PNG_PALETTE for v in colour])
    image.save(path)


VOC_SPLITS = {
    "train": ["2007_000032", "2007_000039", "2008_000002", "2009_000010"],
    "val": ["2007_000033", "2007_000042", "2008_000009"],
    "aug": ["2008_000123", "2010_000001", "2011_000007", "2007_000999"],
}


def write_voc_folder(devkit: Path) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette PNGs in SegmentationClass (train + val),
    index PNGs in SegmentationClassAug (aug, plus a different mask for a train image, as SBD
    has) and ImageSets/Segmentation/{train,val,aug}.txt; returns the VOC2012 folder."""
    voc = devkit / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    index = 0
    for split, stems in VOC_SPLITS.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            size = (24 + 2 * (index % 3), 40)
            image = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
            cv2.imwrite(str(voc / "JPEGImages" / f"{stem}.jpg"), image)
            mask = voc_mask(index, size)
            if split == "aug":
                cv2.imwrite(str(voc / "SegmentationClassAug" / f"{stem}.png"), mask)
            else:
                write_palette_png(voc / "SegmentationClass" / f"{stem}.png", mask)
            index += 1
    # SBD annotates some VOC train images too; train.txt must still read SegmentationClass.
    first = VOC_SPLITS["train"][0]
    cv2.imwrite(str(voc / "SegmentationClassAug" / f"{first}.png"), np.full((24, 40), 5, np.uint8))
    (voc / "JPEGImages" / "2012_999999.jpg").write_bytes(
        (voc / "JPEGImages" / f"{first}.jpg").read_bytes()
    )  # an image no split lists
    return voc
