"""Small replicas of real Hub dataset repositories, laid out file for file like the originals,
for :mod:`hub_server` to serve.

``zhoubolei/scene_parse_150`` (ADE20K SceneParsing):
- ``main`` holds only the loading script and a README (``datasets`` >= 4 refuses scripts);
- ``refs/convert/parquet`` is the Hub's parquet conversion: ``<config>/<split>/NNNN.parquet``
  for the configs ``scene_parsing`` and ``instance_segmentation`` and the splits train,
  validation and test, with no README. ``scene_parsing`` has ``image`` (JPEG), ``annotation``
  (PNG, mode L, 0..150) and ``scene_category`` (ClassLabel); ``instance_segmentation`` has
  ``image`` and a three-channel ``annotation`` (instance ids), so a pipeline that mixes the two
  configurations fails on its masks.

``Chris1/cityscapes`` and ``jxie/pascal-voc-2012``: parquet on the main branch as their dataset
pages and ``dataset_infos.json`` describe them (files, splits, columns); the label encoding of
their masks could not be checked here, so the replicas hold what the recipes expect.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

ADE20K_ID = "zhoubolei/scene_parse_150"
PARQUET_REVISION = "refs/convert/parquet"


def _encoded(suffix: str, array: np.ndarray) -> bytes:
    return cv2.imencode(suffix, array)[1].tobytes()


def _write(path: Path, columns: dict, features, row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict(features.encode_batch(columns), schema=features.arrow_schema)
    pq.write_table(table, path, row_group_size=row_group_size)


def ade20k_scene(index: int, split: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Example ``index`` of ``split``: a random RGB image and a blocky mask of labels 0..150
    (0 and 150 in every one), both ``size`` = (h, w); a function of its arguments."""
    rng = np.random.default_rng([index, len(split)])
    h, w = size
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    blocks = rng.integers(0, 151, (3, 4), dtype=np.uint8)
    blocks[0, :2] = 0, 150  # "other" and the last class, in every scene
    return image, cv2.resize(blocks, (w, h), interpolation=cv2.INTER_NEAREST)


def write_ade20k_replica(
    root: Path,
    *,
    rows: dict[str, int] | None = None,
    shards: dict[str, int] | None = None,
    size: tuple[int, int] = (24, 32),
    row_group_size: int = 4,
) -> dict[str, Path]:
    """Write both revisions of the ADE20K replica under ``root``; returns revision -> folder."""
    from datasets import ClassLabel, Features, Image

    rows = rows or {"train": 24, "validation": 8, "test": 4}
    shards = shards or {"train": 2}
    scene = Features(
        {"image": Image(), "annotation": Image(), "scene_category": ClassLabel(names=["a", "b"])}
    )
    instances = Features({"image": Image(), "annotation": Image()})
    parquet = root / "parquet"
    for split, n in rows.items():
        bounds = np.linspace(0, n, shards.get(split, 1) + 1).astype(int)
        for s in range(len(bounds) - 1):
            images, masks, categories, instance_masks = [], [], [], []
            for i in range(bounds[s], bounds[s + 1]):
                image, mask = ade20k_scene(i, split, size)
                name = f"ADE_{split}_{i:08d}.jpg"
                images.append({"bytes": _encoded(".jpg", image), "path": name})
                masks.append({"bytes": _encoded(".png", mask), "path": None})
                categories.append(i % 2)
                instance_masks.append(
                    {"bytes": _encoded(".png", np.dstack([mask] * 3)), "path": None}
                )
            file = f"{split}/{s:04d}.parquet"
            scene_rows = {"image": images, "annotation": masks, "scene_category": categories}
            instance_rows = {"image": images, "annotation": instance_masks}
            _write(parquet / "scene_parsing" / file, scene_rows, scene, row_group_size)
            _write(
                parquet / "instance_segmentation" / file, instance_rows, instances, row_group_size
            )
    main = root / "main"
    main.mkdir(parents=True, exist_ok=True)
    (main / "scene_parse_150.py").write_text('"""ADE20K loading script."""\nimport datasets\n')
    (main / "README.md").write_text("---\nlicense: bsd-3-clause\n---\n# Scene parsing (ADE20K)\n")
    return {"main": main, PARQUET_REVISION: parquet}


def serve_ade20k(hub, root: Path, **options) -> None:
    """Write the ADE20K replica under ``root`` and serve both its revisions from ``hub``."""
    for revision, folder in write_ade20k_replica(root, **options).items():
        hub.add(ADE20K_ID, folder, revision=revision)


CITYSCAPES_ID = "Chris1/cityscapes"
VOC_ID = "jxie/pascal-voc-2012"


def _write_split(path: Path, columns: tuple[str, str], masks: list[np.ndarray]) -> None:
    from datasets import Features, Image

    rng = np.random.default_rng(len(masks))
    images = [rng.integers(0, 256, (*m.shape, 3), dtype=np.uint8) for m in masks]
    rows = {
        columns[0]: [{"bytes": _encoded(".png", i), "path": None} for i in images],
        columns[1]: [{"bytes": _encoded(".png", m), "path": None} for m in masks],
    }
    _write(path, rows, Features({c: Image() for c in columns}), row_group_size=2)


def _blocks(values: list[int], seed: int, size: tuple[int, int]) -> np.ndarray:
    picks = np.random.default_rng(seed).choice(values, (2, 3)).astype(np.uint8)
    return cv2.resize(picks, size[::-1], interpolation=cv2.INTER_NEAREST)


def write_cityscapes_replica(root: Path, rows: int = 4, size=(16, 32)) -> Path:
    """``Chris1/cityscapes``'s main branch: ``data/<split>-*.parquet`` with ``image`` and
    ``semantic_segmentation`` (Cityscapes labelIds 0..33)."""
    label_ids = [0, 1, 4, 7, 8, 11, 17, 21, 23, 24, 26, 33]
    for split in ("train", "validation", "test"):
        masks = [_blocks(label_ids, i, size) for i in range(rows)]
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        _write_split(path, ("image", "semantic_segmentation"), masks)
    return root


def write_voc_replica(root: Path, rows: int = 4, size=(16, 16)) -> Path:
    """``jxie/pascal-voc-2012``'s main branch: ``data/<split>-*.parquet`` with ``image`` and
    ``mask`` (class indices 0..20, 255 void)."""
    for split in ("train", "val"):
        masks = [_blocks([0, 0, 5, 15, 20, 255], i, size) for i in range(rows)]
        _write_split(root / "data" / f"{split}-00000-of-00001.parquet", ("image", "mask"), masks)
    return root
