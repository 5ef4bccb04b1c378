"""Run inside the MMSegmentation environment (``MmsegEnv.run``): images/s of MMSegmentation
1.2.2's own ADE20K train pipeline on one thread, for ``bench/data_pipeline.py``.

    pipeline_bench.py INPUTS.npz [--rounds R] [--warmup W] [--seed S]

``INPUTS.npz`` holds the encoded examples as uint8 byte arrays: ``image_<k>`` (JPEG) and
``mask_<k>`` (PNG, ADE20K labels 0..150). They are served from memory through an mmengine file
backend (prefix ``memory://``), so the registered transforms run unchanged and read no file, as
hooktrain's side starts from the same bytes in memory. Per image:

``LoadImageFromFile`` (``mmcv.imfrombytes``, cv2, BGR) -> ``LoadAnnotations(reduce_zero_label=True)``
(pillow, unchanged) -> ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``
-> ``RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)`` -> ``RandomFlip(prob=0.5)`` ->
``PhotoMetricDistortion`` -> ``PackSegInputs`` -> ``SegDataPreProcessor`` (BGR to RGB, ImageNet
mean/std, padding to 512x512 with 0 and 255) on the CPU, one image at a time: a normalised
padded float32 image and a padded int64 mask, what hooktrain's ``TrainTransform`` returns.

Every draw of these transforms comes from numpy's global generator; image ``i`` of round ``r``
runs after ``np.random.seed([S, r, 0, i])`` (its warm-up images after ``[S, r, 1, i]``), so a
caller drawing the same numbers does the same work. Each round first runs ``W`` warm-up images
(untimed; their outputs' digests are printed so the caller can check it produced the same),
then times one pass over all images. OpenCV and torch use one thread.

The last line printed is one JSON object: ``images_per_s`` (one per round), ``images``,
``warmup``, ``warmup_digests`` (per round, per warm-up image) and the package versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import cv2
import mmcv
import mmengine
import mmseg
import numpy as np
import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.fileio import BaseStorageBackend, register_backend
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.utils import register_all_modules

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
CROP = (512, 512)
PREFIX = "memory"


class MemoryBackend(BaseStorageBackend):
    """An mmengine file backend that serves ``memory://<key>`` from :attr:`files`."""

    files: dict[str, bytes] = {}

    def get(self, filepath) -> bytes:
        return self.files[str(filepath)]

    def get_text(self, filepath, encoding="utf-8") -> str:
        return self.get(filepath).decode(encoding)


def train_pipeline() -> Compose:
    """The ADE20K 512x512 train pipeline of MMSegmentation 1.2.2's configs."""
    return Compose([
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "reduce_zero_label": True},
        {"type": "RandomResize", "scale": (2048, 512), "ratio_range": (0.5, 2.0), "keep_ratio": True},
        {"type": "RandomCrop", "crop_size": CROP, "cat_max_ratio": 0.75},
        {"type": "RandomFlip", "prob": 0.5},
        {"type": "PhotoMetricDistortion"},
        {"type": "PackSegInputs"},
    ])  # fmt: skip


def load_examples(path: str) -> list[tuple[str, str]]:
    """Put the examples of ``path`` into :class:`MemoryBackend`; return their (image, mask) paths."""
    inputs = np.load(path)
    count = len([name for name in inputs.files if name.startswith("image_")])
    paths = []
    for k in range(count):
        image_path, mask_path = f"{PREFIX}://image_{k}.jpg", f"{PREFIX}://mask_{k}.png"
        MemoryBackend.files[image_path] = inputs[f"image_{k}"].tobytes()
        MemoryBackend.files[mask_path] = inputs[f"mask_{k}"].tobytes()
        paths.append((image_path, mask_path))
    return paths


def results_for(image_path: str, mask_path: str) -> dict:
    """The dict ``BaseSegDataset.get_data_info`` gives the pipeline for one ADE20K example."""
    return {
        "img_path": image_path,
        "seg_map_path": mask_path,
        "label_map": None,
        "reduce_zero_label": True,
        "seg_fields": [],
    }


def run_one(pipeline: Compose, preprocessor: SegDataPreProcessor, paths: tuple[str, str]):
    """One example through the pipeline and the preprocessor: (image [3,H,W], mask [H,W])."""
    with torch.no_grad():
        batch = preprocessor(pseudo_collate([pipeline(results_for(*paths))]), training=True)
    return batch["inputs"][0], batch["data_samples"][0].gt_sem_seg.data[0]


def digest(image: torch.Tensor, mask: torch.Tensor) -> str:
    """A short digest of the float32 image and int64 mask (as hooktrain's side computes it)."""
    data = image.to(torch.float32).contiguous().numpy().tobytes() + mask.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def run_round(pipeline, preprocessor, paths, seed: int, round_index: int, warmup: int) -> tuple[float, list[str]]:
    """``warmup`` untimed images, then one timed pass: (images/s, the warm-up digests)."""
    digests = []
    for i in range(warmup):
        np.random.seed([seed, round_index, 1, i])
        digests.append(digest(*run_one(pipeline, preprocessor, paths[i % len(paths)])))
    start = time.perf_counter()
    for i, example in enumerate(paths):
        np.random.seed([seed, round_index, 0, i])
        run_one(pipeline, preprocessor, example)
    return len(paths) / (time.perf_counter() - start), digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", help=".npz with image_<k> (JPEG) and mask_<k> (PNG) byte arrays")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=4, help="untimed images before each round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    register_all_modules()
    register_backend(PREFIX, MemoryBackend, prefixes=PREFIX, force=True)
    pipeline = train_pipeline()
    preprocessor = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=CROP)
    paths = load_examples(args.inputs)
    rates, digests = [], []
    for r in range(args.rounds):
        rate, round_digests = run_round(pipeline, preprocessor, paths, args.seed, r, args.warmup)
        rates.append(round(rate, 2))
        digests.append(round_digests)
    print(json.dumps({
        "images_per_s": rates,
        "images": len(paths),
        "warmup": args.warmup,
        "warmup_digests": digests,
        "versions": {"mmsegmentation": mmseg.__version__, "mmcv": mmcv.__version__, "mmengine": mmengine.__version__},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
